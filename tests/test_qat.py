"""Prune + quantise + LoRA in one pass: what QAT trains is what the HF directory and the GGUF hold,
pruned weights stay exact zeros, structured pruning shrinks to whole groups before QAT, resume, and
every refusal comes before work."""

import copy
import importlib.util
import json

import pytest
import torch

from slimtune.adapters.lora import LoraSettings
from slimtune.api import check_config, prune_
from slimtune.config import LoRAPruneConfig, OneShotConfig
from slimtune.errors import SlimtuneError
from slimtune.export.gguf import export_gguf, gguf_state_dict
from slimtune.models.arch import get_arch
from slimtune.pruning.pruner import PruneSettings
from slimtune.quant import QuantizerSet
from slimtune.quant.qat import QuantSettings
from slimtune.training.averaging import AveragingSettings
from slimtune.training.distill import DistillSettings
from slimtune.training.loop import TrainSettings
from tests.conftest import interrupt_training_at, tiny_model

PROJ = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _qmodel(**overrides):
    """Widths that split into groups of 32: hidden 96, MLP 160 (6 heads of 16, 2 KV heads)."""
    return tiny_model("llama", **{"hidden_size": 96, "intermediate_size": 160, **overrides})


def _tokens(n=24, length=16, seed=0):
    """Learnable windows: arithmetic progressions mod 96."""
    g = torch.Generator().manual_seed(seed)
    start, step = torch.randint(0, 96, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    return (start + step * torch.arange(length)) % 96


TOKENS = _tokens()


def _config(cls=LoRAPruneConfig, steps=6, quant="w4g32", quantizer="lsq", quant_start=None, train=None, **prune):
    return cls(prune=PruneSettings(**{"sparsity": 0.0, "exclude_layers": [0], **prune}),
               lora=LoraSettings(r=4, alpha=8, dropout=0.0),
               train=TrainSettings(**{"steps": steps, "batch_size": 2, "warmup_steps": 0, "checkpoint_every": 0, "lr": 2e-3, **(train or {})}),
               quant=QuantSettings(spec=quant, quantizer=quantizer, quant_start=quant_start),
               **({"criterion": "taylor", "calib_batches": 2} if cls is OneShotConfig else {}))


def _loss(model, x):
    with torch.no_grad():
        return float(model(x, labels=x).loss)


def _projections(model):
    spec = get_arch(model)
    for i, layer in enumerate(spec.decoder_layers(model)):
        for path in spec.projections():
            yield i, path, layer.get_submodule(path).weight


def _gguf_matches_model(model, quantizers, path):
    """The GGUF written from the trained quantisers de-quantises to the model's weights, bit for bit."""
    report = export_gguf(model, None, path, dtype=quantizers.spec.gguf_type.lower(), quantizers=quantizers)
    state, meta = gguf_state_dict(path)
    for i, p, w in _projections(model):
        assert report["tensors"][f"blk.{i}.{PROJ[p]}.weight"] == quantizers.spec.gguf_type
        assert torch.equal(state[f"model.layers.{i}.{p}.weight"], w.detach().float()), (i, p)
    return meta


# ---- settings and refusals, before any model is touched --------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"spec": "w4x"}, "cannot parse quantisation spec 'w4x'"),
    ({"spec": "w4g32a"}, "lsq learns a step size only and needs a symmetric spec"),
    ({"spec": "w4g32", "quantizer": "lsq+"}, "lsq+ learns an offset and needs an affine spec"),
    ({"spec": "w4g32", "quantizer": "gptq"}, "unknown --quantizer 'gptq'"),
    ({"spec": "w4g32", "quant_start": 1.0}, "--quant-start 1.0 is outside [0, 1)"),
    ({"spec": "w4g32", "quant_lr": 0.0}, "--quant-lr must be positive"),
    ({"spec": "w4g32", "quant_init": "zeros"}, "unknown --quant-init 'zeros'"),
])
def test_quant_settings_refuse_in_one_line(kwargs, message):
    with pytest.raises(SlimtuneError) as err:
        QuantSettings(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not QuantSettings().enabled


@pytest.mark.parametrize("build, message", [
    (lambda: LoRAPruneConfig(lora=LoraSettings(variant="dora"), quant=QuantSettings(spec="w4g32")), "DoRA renormalises"),
    (lambda: LoRAPruneConfig(quant=QuantSettings(spec="w4g32"), averaging=AveragingSettings(ema=0.5)), "--ema/--swa average the LoRA weights"),
    (lambda: _config(quant="w4g32a", quantizer="lsq+", granularity="unstructured", sparsity=0.3), "need a symmetric --quant"),
    (lambda: LoRAPruneConfig(quant=QuantSettings(spec="w4g32"), distill=DistillSettings(enabled=True)), "no dense teacher is left"),
    (lambda: _config(steps=10, quant_start=0.5, granularity="channels", sparsity=0.2), "before the pruning ramp ends at step 9"),
    (lambda: _config(steps=10, granularity="channels", sparsity=0.2, cooldown=0.0), "train no step; raise --cooldown"),  # not a --quant-start that is refused next
    (lambda: _config(steps=10, granularity="unstructured", sparsity=0.2, quant_start=0.95), "train no step; lower --quant-start"),
    (lambda: OneShotConfig(criterion="taylor", recover_steps=0, quant=QuantSettings(spec="w4g32")), "--recover-steps 0 leaves no training"),
])
def test_method_config_refuses_what_qat_cannot_honour(build, message):
    with pytest.raises(SlimtuneError) as err:
        build()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_check_config_refuses_widths_quantised_models_and_split_heads():
    with pytest.raises(SlimtuneError, match=r"group size 32 does not divide the 72 input features of layer 0 self_attn.q_proj"):
        check_config(tiny_model("llama"), _config())  # the default tiny widths: hidden 72, MLP 80
    quantised = _qmodel()
    quantised.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(SlimtuneError, match="already quantised"):
        check_config(quantised, _config())
    with pytest.raises(SlimtuneError, match="one head is 16 input columns of o_proj, not a multiple of 32"):
        check_config(_qmodel(), _config(granularity="heads,channels", sparsity=0.2, steps=10))
    check_config(_qmodel(), _config(granularity="channels", sparsity=0.2, steps=10))  # channels are aligned when QAT starts
    check_config(_qmodel(), _config(quant="w4", granularity="heads,channels", sparsity=0.2, steps=10))  # per channel: any width
    gguf = _config(quant="w8")
    gguf.quant.gguf_blocks = True  # --export gguf: every width must split into blocks of 32
    with pytest.raises(SlimtuneError, match="not a multiple of GGUF's block of 32; use --export hf"):
        check_config(_qmodel(intermediate_size=144), gguf)


# ---- where learned steps start ----------------------------------------------------------------------
@pytest.mark.parametrize("spec, kind", [("w4g32", "lsq"), ("w3g32", "lsq"), ("w8", "lsq"), ("w4g32a", "lsq+")])
def test_mse_init_rounds_pretrained_weights_better_than_the_paper_init(spec, kind):
    from slimtune.quant import make_quantizer

    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    paper = make_quantizer(kind, spec, w)
    mse = make_quantizer(kind, spec, w)
    mse.init_mse_(w)
    fake = make_quantizer("fake", spec, w).eval()
    with torch.no_grad():
        err = {name: float((q(w) - w).square().sum()) for name, q in (("paper", paper), ("mse", mse), ("minmax", fake))}
    assert err["mse"] <= err["paper"] and err["mse"] <= err["minmax"] * 1.0001, err
    s, b = mse.qparams()
    assert torch.equal(s, s.half().float()) and (b is None or torch.equal(b, b.half().float()))  # what GGUF stores
    assert torch.equal(mse.dequantize(mse.codes(w)), mse(w))


# ---- QAT without pruning ---------------------------------------------------------------------------
def test_qat_without_pruning_trains_the_steps_and_the_gguf_holds_exactly_the_trained_weights(tmp_path):
    base = _qmodel()
    start = QuantizerSet(copy.deepcopy(base), "w4g32", "lsq", init="mse")  # what QAT starts from (B = 0: merged = W0)
    rtn = copy.deepcopy(base)
    with torch.no_grad():
        for i, p, w in _projections(rtn):
            w.copy_(start[i, p].eval()(w))
    result = prune_(base, _config(steps=8), TOKENS, progress=False)
    model, qs = result.model, result.quantizers
    assert result.quant["start_step"] == 0 and result.quant["qat_steps"] == 8 and result.quant["modules"] == 4 * 7
    assert not hasattr(model, "slimtune_quantizers") and not any(hasattr(m, "lora_A") for m in model.modules())
    moved = [float((qs[k].qparams()[0] - start[k].qparams()[0]).abs().max()) for k in qs.keys()]
    assert all(m > 0 for m in moved)  # every projection's step sizes trained
    for i, p, w in _projections(model):  # the HF weights are fake-quantised: quantising them again changes nothing
        assert torch.equal(qs[i, p](w.detach()), w.detach())
    _gguf_matches_model(model, qs, tmp_path / "m.gguf")
    assert _loss(model, TOKENS) < _loss(rtn, TOKENS)  # vs round-to-nearest of the same start (fine-tuning included)


def test_fake_quantizer_qat_exports_the_observed_scales(tmp_path):
    result = prune_(_qmodel(), _config(steps=3, quant="w8g32", quantizer="fake"), TOKENS, progress=False)
    qs = result.quantizers
    for i, p, w in _projections(result.model):
        assert torch.equal(qs[i, p](w.detach()), w.detach())
    _gguf_matches_model(result.model, qs, tmp_path / "f.gguf")


# ---- unstructured + LSQ ----------------------------------------------------------------------------
def test_unstructured_lsq_keeps_every_pruned_weight_zero_and_a_code(tmp_path):
    # QAT from a quarter of the steps: the masks keep growing under the quantisers
    config = _config(steps=8, granularity="unstructured", sparsity=0.3, quant_start=0.25, warmup=0.0, cooldown=0.25)
    result = prune_(_qmodel(), config, TOKENS, progress=False)
    assert result.quant["start_step"] == 2
    assert result.sparsity["achieved"] == pytest.approx(0.3, abs=0.01)
    model, qs, masks = result.model, result.quantizers, result.masks.as_dict()
    layers = get_arch(model).decoder_layers(model)
    pruned = 0
    for (i, p), keep in masks.items():
        w = layers[i].get_submodule(p).weight.detach()
        assert torch.equal(w[~keep], torch.zeros(int((~keep).sum())))
        assert torch.equal(qs[i, p].codes(w)[~keep], torch.zeros(int((~keep).sum()), dtype=torch.int16))  # 0 is a code
        pruned += int((~keep).sum())
    assert pruned > 0
    _gguf_matches_model(model, qs, tmp_path / "u.gguf")
    state, _ = gguf_state_dict(tmp_path / "u.gguf")
    for (i, p), keep in masks.items():
        assert torch.equal(state[f"model.layers.{i}.{p}.weight"][~keep], torch.zeros(int((~keep).sum())))


def test_distillation_teacher_pauses_the_quantisers(monkeypatch):
    """The dense teacher (adapters off, masks open) must also run without fake quantisation."""
    import slimtune.quant.qat as qat

    real, calls = qat.attach_quantizers, {"paused": 0}

    def spy(*args, **kwargs):
        handles = real(*args, **kwargs)
        paused = handles.paused

        def counting():
            calls["paused"] += 1
            return paused()

        handles.paused = counting
        return handles

    monkeypatch.setattr(qat, "attach_quantizers", spy)
    config = _config(steps=3, granularity="unstructured", sparsity=0.3, quant_start=0.0)
    config.distill = DistillSettings(enabled=True, mix=0.5)
    result = prune_(_qmodel(), config, TOKENS, progress=False)
    assert calls["paused"] == 3  # one teacher forward per micro-batch, quantisers paused
    assert all(r["kl"] >= 0 and "lm_loss" in r for r in result.history)


# ---- structured: shrink when the ramp ends, then QAT -------------------------------------------------
@pytest.mark.parametrize("cls, granularity, sparsity", [(LoRAPruneConfig, "channels", 0.2), (OneShotConfig, "layers,channels", 0.3)])
def test_structured_qat_shrinks_to_whole_groups_and_the_gguf_has_the_per_layer_shapes(tmp_path, cls, granularity, sparsity):
    config = _config(cls, steps=8, granularity=granularity, sparsity=sparsity)
    result = prune_(_qmodel(), config, TOKENS, progress=False)
    q = result.quant
    assert q["shrunk_at_start"] and q["start_step"] == (7 if cls is LoRAPruneConfig else 0)  # the ramp of 8 steps ends at 7
    assert result.sparsity["achieved"] == pytest.approx(sparsity, abs=0.03)  # MLP widths rounded to 32 around the target
    model, qs = result.model, result.quantizers
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert all(w % 32 == 0 for w in widths) and min(widths) < 160
    assert [s["intermediate"] for s in result.shrink["layers"]] == widths
    for (i, p), quantizer in qs.as_dict().items():  # the quantisers were built on the shrunk shapes
        assert (quantizer.out_features, quantizer.in_features) == tuple(model.model.layers[i].get_submodule(p).weight.shape)
    meta = _gguf_matches_model(model, qs, tmp_path / "s.gguf")
    assert meta["intermediate"] == widths and len(meta["intermediate"]) == len(model.model.layers)
    assert meta["architecture"] == "deci"  # the unpruned first layer keeps 160: per-layer sizes


def test_resume_after_qat_started_continues_exactly(tmp_path, monkeypatch):

    # steps 6, ramp steps 3..4, QAT (after shrinking) from step 4; a checkpoint after every step
    config = _config(steps=6, granularity="channels", sparsity=0.2, warmup=0.34, cooldown=0.34, train={"checkpoint_every": 1})
    full = prune_(_qmodel(), copy.deepcopy(config), TOKENS, work_dir=tmp_path / "a", progress=False)
    restore = interrupt_training_at(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        prune_(_qmodel(), copy.deepcopy(config), TOKENS, work_dir=tmp_path / "b", progress=False)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["quant"]["started"]
    restore()
    resumed = prune_(_qmodel(), copy.deepcopy(config), TOKENS, work_dir=tmp_path / "b", resume=True, progress=False)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-5)
    for k in full.quantizers.keys():
        assert torch.allclose(full.quantizers[k].qparams()[0], resumed.quantizers[k].qparams()[0])
    for (_, _, a), (_, _, b) in zip(_projections(full.model), _projections(resumed.model)):
        assert torch.allclose(a, b, atol=1e-6)


# ---- QAT beats round-to-nearest where rounding hurts -------------------------------------------------
@pytest.mark.slow
def test_qat_beats_round_to_nearest_and_finetune_then_round():
    """A tiny model first learns the data, so 2-bit rounding damages it; QAT then recovers more than
    rounding its weights (or a LoRA fine-tune of the same length followed by rounding) does."""
    train, test = _tokens(96, seed=1)[:80], _tokens(96, seed=1)[80:]
    base = _qmodel(num_hidden_layers=2)
    opt = torch.optim.Adam(base.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    base.train()
    for _ in range(100):
        x = train[torch.randint(0, 80, (8,), generator=g)]
        base(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    base.eval()

    def rounded(model):
        model = copy.deepcopy(model)
        qs = QuantizerSet(model, "w2g32", "lsq", init="mse").eval()
        with torch.no_grad():
            for i, p, w in _projections(model):
                w.copy_(qs[i, p](w))
        return model

    def run(quant):
        config = _config(steps=12, quant=quant, train={"batch_size": 4, "lr": 1e-3})
        return prune_(copy.deepcopy(base), config, train, progress=False).model

    qat = _loss(run("w2g32"), test)
    assert qat < _loss(rounded(base), test)
    assert qat < _loss(rounded(run(None)), test)


# ---- CLI ---------------------------------------------------------------------------------------------
FAST = ["--seq-len", "16", "--eval-windows", "2", "--latency-seq-len", "8", "--latency-repeats", "1", "--decode-tokens", "2", "--quiet"]


def _bpe(corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<|endoftext|>")


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    paras = [f"Paragraph {i} talks about topic {i % 7} with some words and numbers {i * 13}." * 3 for i in range(60)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(paras))
    return path, _bpe(paras)


def _model_dir(tmp_path, tokenizer, family="llama", **overrides):
    # 4 heads of 32: removing a head removes one whole group of o_proj's inputs
    model = tiny_model(family, **{"hidden_size": 96, "intermediate_size": 160, "vocab_size": 320, "num_attention_heads": 4, "head_dim": 32, **overrides})
    path = tmp_path / family
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


LLAMACPP = ["--llamacpp-check"] if importlib.util.find_spec("xllamacpp") else []


def _cli(capsys, *argv):
    from slimtune.cli import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.err


def test_cli_prune_quantise_and_export_gguf(tmp_path, corpus_and_tokenizer, capsys):
    text, tok = corpus_and_tokenizer
    model_dir = _model_dir(tmp_path, tok)
    out = tmp_path / "out"
    code, err = _cli(capsys, "prune", "--model", model_dir, "--data", text, "--out", out, "--quant", "w4g32", "--quantizer", "lsq",
                     "--sparsity", "0.2", "--export", "gguf", "--steps", "6", "--batch-size", "2", *LLAMACPP, *FAST)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["quant"]["spec"] == "w4g32" and report["quant"]["shrunk_at_start"]
    if LLAMACPP:  # the non-uniform Q4_0 file runs in a real llama.cpp and scores like the trained model
        check = report["gguf"]["llamacpp"]
        assert check["windows"] >= 1 and abs(check["relative_gap"]) < 0.02, check
        assert "checked in llama.cpp" in (out / "report.md").read_text()
    assert report["gguf"]["from_trained_quantizers"] and report["gguf"]["tensor_types"]["Q4_0"] == 4 * 7
    assert report["reload_max_abs_diff"] < 1e-4
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out)
    state, meta = gguf_state_dict(out / "model.gguf")
    for i, p, w in _projections(hf):  # transformers users get exactly what the GGUF holds
        assert torch.equal(state[f"model.layers.{i}.{p}.weight"], w.detach().float()), (i, p)
    assert meta["intermediate"] == [layer.mlp.down_proj.in_features for layer in hf.model.layers]
    md = (out / "report.md").read_text()
    assert "de-quantised values of the trained quantisers" in md and "llama-cli -m model.gguf" in md
    assert not (out / "adapters").exists()  # the shrunk adapters do not fit the unpruned base


def test_cli_gguf_without_qat_writes_the_requested_type(tmp_path, corpus_and_tokenizer, capsys):
    text, tok = corpus_and_tokenizer
    out = tmp_path / "out"
    code, err = _cli(capsys, "prune", "--model", _model_dir(tmp_path, tok), "--data", text, "--out", out, "--granularity", "layers",
                     "--criterion", "magnitude", "--sparsity", "0.2", "--recover-steps", "0", "--export", "gguf", "--gguf-type", "q8_0", *FAST)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["quant"] is None and report["gguf"]["type"] == "q8_0" and not report["gguf"]["from_trained_quantizers"]
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)  # uniform: plain llama
    assert len(reloaded.model.layers) == len(AutoModelForCausalLM.from_pretrained(out).model.layers)


@pytest.mark.parametrize("family, args, message", [
    ("qwen2", ["--export", "gguf"], "GGUF export supports llama, mistral models, not qwen2"),
    ("llama", ["--export", "gguf", "--quant", "w3g32"], "has no GGUF block type"),
    ("llama", ["--export", "gguf", "--quant", "w8", "--sparsity", "0"], "not a multiple of GGUF's block of 32"),
    ("llama", ["--quant", "w4g32", "--granularity", "heads", "--export", "gguf", "--quant-start", "0.3"], "before the pruning ramp ends"),
])
def test_cli_refuses_before_training(tmp_path, corpus_and_tokenizer, capsys, monkeypatch, family, args, message):
    from slimtune.training.loop import Trainer

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(Trainer, "run", no_training)
    text, tok = corpus_and_tokenizer
    overrides = {"intermediate_size": 144} if "w8" in args else {}
    model_dir = _model_dir(tmp_path, tok, family, **overrides)
    code, err = _cli(capsys, "prune", "--model", model_dir, "--data", text, "--out", tmp_path / "o", "--steps", "4", *args, *FAST)
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("slimtune: error:") and message in line, err
    assert not (tmp_path / "o").exists()


def test_report_counts_the_kept_weights_quantisation_rounded_to_zero(tmp_path, cli_inputs, capsys):
    """The audit found 61,870 zeros in a saved model whose report said 61,680 were pruned: the grid
    rounds some kept weights to 0. The report now says how many, measured on the saved weights."""
    from safetensors.torch import load_file

    from tests.conftest import run_prune_cli

    out = tmp_path / "q"
    code, err = run_prune_cli(capsys, cli_inputs, out, "--granularity", "unstructured", "--sparsity", "0.3", "--quant", "w4", "--steps", "6", "--cooldown", "0.4", "--no-eval")
    assert code == 0, err
    sp = json.loads((out / "report.json").read_text())["sparsity"]
    weights = load_file(out / "model.safetensors")
    zeros = sum(int((t == 0).sum()) for k, t in weights.items() if ".layers." in k and k.endswith("proj.weight"))
    assert sp["zeros_in_weights"] == zeros and sp["rounded_to_zero"] > 0
    assert zeros - sp["rounded_to_zero"] == sp["decoder_params_before"] - sp["decoder_params_after"]
    assert f"{sp['rounded_to_zero']:,} kept weights that quantisation rounded to 0" in (out / "report.md").read_text()


def test_group_alignment_keeps_a_local_ranking_uniform():
    """QAT rounds kept MLP widths to whole groups. Under local ranking every pruned layer keeps the
    same width, and the rounding used to diffuse its error over the layers (96/96/64/96 in the audit):
    a run asked to be uniform saved a non-uniform model, and its GGUF could not load in transformers."""
    model = _qmodel(num_hidden_layers=6)
    config = _config(steps=10, granularity="channels", sparsity=0.25)
    result = prune_(model, config, TOKENS, progress=False)
    widths = [layer.mlp.down_proj.in_features for layer in get_arch(result.model).decoder_layers(result.model)]
    pruned = widths[1:]  # _config excludes layer 0
    assert len(set(pruned)) == 1 and pruned[0] % 32 == 0 and pruned[0] < 160, widths
