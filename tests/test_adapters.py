"""LoRA-family set-up through PEFT, saving for the original base model, and a merge that keeps
every pruned weight exactly zero."""

import copy
import json

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from slimtune.adapters import (
    LoraSettings,
    attach_lora,
    lora_pairs,
    lora_weights,
    merge_keep_masks,
    mutates_base,
    save_adapters,
    save_initial_adapters,
    scaling,
)
from slimtune.errors import SlimtuneError
from slimtune.masking.gates import attach_gates
from slimtune.masking.structured import StructuredMasks
from slimtune.models.arch import get_arch
from tests.conftest import tiny_model

TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.mark.parametrize("fam", ["llama", "opt"])
def test_default_targets_are_the_seven_projections(fam):
    base = tiny_model(fam)
    spec = get_arch(base)
    model = attach_lora(base)
    assert set(model.peft_config["default"].target_modules) == set(spec.leaf_names())
    pairs = lora_pairs(model)
    n_proj = len(spec.projections())
    assert n_proj == (7 if fam == "llama" else 6)  # OPT has one MLP input projection (fc1)
    assert len(pairs) == n_proj * len(spec.decoder_layers(model))
    assert [p for _, p, _ in pairs[:n_proj]] == list(spec.projections())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert scaling(pairs[0][2]) == 16 / 8


def test_settings_and_targets_are_validated():
    with pytest.raises(SlimtuneError) as err:
        attach_lora(tiny_model("llama"), LoraSettings(targets=["q_proj", "q_prj"]))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("target modules q_prj match nothing")
    assert "available: " in msg and "down_proj" in msg and "lm_head" in msg
    for bad in (dict(variant="qlora"), dict(r=0), dict(alpha=-1), dict(dropout=1.0), dict(targets=[])):
        with pytest.raises(SlimtuneError):
            LoraSettings(**bad)
    model = attach_lora(tiny_model("llama"), LoraSettings(targets=["q_proj", "v_proj"]))
    assert {p.rsplit(".", 1)[-1] for _, p, _ in lora_pairs(model)} == {"q_proj", "v_proj"}


def test_rslora_scaling():
    model = attach_lora(tiny_model("llama"), LoraSettings(r=4, alpha=16, variant="rslora"))
    assert all(scaling(m) == 16 / 4**0.5 for _, _, m in lora_pairs(model))


@pytest.mark.parametrize("variant", ["dora", "pissa"])
def test_dora_and_pissa_start_at_the_base_model(variant):
    base = tiny_model("llama")
    ref = logits(base)
    weights = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith("q_proj")}
    model = attach_lora(base, LoraSettings(r=4, variant=variant)).eval()
    torch.testing.assert_close(logits(model), ref, atol=1e-4, rtol=0)
    if variant == "pissa":  # the frozen base is the residual: W_res + s·B·A == W
        for name, m in model.named_modules():
            if name.endswith("q_proj") and hasattr(m, "get_base_layer"):
                A, B = lora_weights(m)
                key = name.split("base_model.model.", 1)[1]
                torch.testing.assert_close(m.get_base_layer().weight + scaling(m) * B @ A, weights[key], atol=1e-5, rtol=0)
    else:
        trainable = {n.rsplit(".", 2)[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
        assert "lora_magnitude_vector" in trainable


def train_a_little(model, steps=3, lr=0.5):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for s in range(steps):
        tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(s))
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_merge_keeps_structured_pruning_exact(variant):
    """DoRA merges to (m/n)⊙V with n over the whole row, pruned columns included; the gated forward
    uses the same n, so zeroing the pruned entries after the merge is exact for it too."""
    model = attach_lora(tiny_model("llama"), LoraSettings(r=4, dropout=0.0, variant=variant))
    spec, cfg = get_arch(model), model.config
    d = cfg.head_dim  # 6 query heads share 2 KV heads: heads 0-2 use KV head 0, heads 3-5 KV head 1
    masks = StructuredMasks(model)
    masks.set(1, heads=[1, 1, 1, 0, 0, 0])  # a whole KV group
    masks.set(2, heads=[0, 1, 1, 1, 1, 1])  # one query head of a shared KV group
    keep = torch.ones(cfg.intermediate_size)
    keep[::3] = 0
    masks.set(2, channels=keep)
    gates = attach_gates(model, masks)  # after attach_lora, so the gates also cover the LoRA path
    train_a_little(model)
    o = lora_pairs(model)[len(spec.projections()) * 1 + 3][2]  # layer 1, o_proj: its B·A is dense in the pruned columns
    assert bool((lora_weights(o)[1] @ lora_weights(o)[0])[:, 3 * d :].abs().sum() > 0)
    if variant == "dora":
        magnitude = o.lora_magnitude_vector["default"].weight
        assert not torch.allclose(magnitude, o.get_base_layer().weight.norm(dim=1))  # m was trained
    gated = logits(model)
    merged = merge_keep_masks(model, masks)
    assert not hasattr(merged, "peft_config")
    layers = spec.decoder_layers(merged)
    w = lambda i, path: layers[i].get_submodule(path).weight  # noqa: E731
    assert (w(1, spec.q)[3 * d :] == 0).all() and (w(1, spec.o)[:, 3 * d :] == 0).all()
    assert (w(1, spec.k)[d:] == 0).all() and (w(1, spec.v)[d:] == 0).all()
    assert (w(1, spec.q)[: 3 * d] != 0).any(dim=1).all() and (w(1, spec.k)[:d] != 0).any(dim=1).all()
    assert (w(2, spec.q)[:d] == 0).all() and (w(2, spec.o)[:, :d] == 0).all()
    assert (w(2, spec.k) != 0).all(dim=1).all()  # the KV head is still shared by kept query heads
    for path in spec.mlp_in:
        assert (w(2, path)[::3] == 0).all() and (w(2, path)[1::3] != 0).any(dim=1).all()
    assert (w(2, spec.mlp_out)[:, ::3] == 0).all()
    torch.testing.assert_close(logits(merged), gated, atol=1e-5, rtol=1e-5)
    gates.remove()


@pytest.mark.parametrize("fam", ["llama", "opt"])
def test_merge_makes_a_pruned_layer_the_identity_its_gate_was(fam):
    """A whole pruned layer: merged but not shrunk, it used to compute again with its merged weights
    (logits off by about 1.4). Now every head and channel goes, and OPT's output biases with them."""
    model = attach_lora(tiny_model(fam), LoraSettings(r=4, dropout=0.0))
    spec = get_arch(model)
    masks = StructuredMasks(model)
    masks.set(1, layer=0.0)
    gates = attach_gates(model, masks)
    train_a_little(model)
    gated = logits(model)
    merged = merge_keep_masks(model, masks)
    layer = spec.decoder_layers(merged)[1]
    for path in spec.projections():
        assert not layer.get_submodule(path).weight.any(), path
    if fam == "opt":
        assert not layer.get_submodule(spec.o).bias.any() and not layer.get_submodule(spec.mlp_out).bias.any()
    torch.testing.assert_close(logits(merged), gated, atol=1e-5, rtol=1e-5)
    gates.remove()


def test_merge_keeps_unstructured_zeros():
    model = attach_lora(tiny_model("llama"), LoraSettings(r=4, dropout=0.0))
    spec = get_arch(model)
    gen = torch.Generator().manual_seed(5)
    weight_masks = {}
    for i, path, m in lora_pairs(model)[:10]:
        keep = torch.rand(m.get_base_layer().weight.shape, generator=gen) > 0.5
        weight_masks[(i, path)] = keep
        with torch.no_grad():
            m.get_base_layer().weight.mul_(keep)
    train_a_little(model)
    expected = {}
    for i, path, m in lora_pairs(model)[:10]:
        A, B = lora_weights(m)
        expected[(i, path)] = (m.get_base_layer().weight + scaling(m) * B @ A).detach()
    merged = merge_keep_masks(model, weight_masks=weight_masks)
    layers = spec.decoder_layers(merged)
    for (i, path), keep in weight_masks.items():
        weight = layers[i].get_submodule(path).weight
        assert (weight[~keep] == 0).all()
        torch.testing.assert_close(weight[keep], expected[(i, path)][keep])


HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora", "pissa", "lora_ga"])
def test_saved_adapters_apply_to_the_original_base(tmp_path, variant):
    """PiSSA and LoRA-GA rewrite the base weights in place (W -> W_res); the saved adapter must still fit W."""
    from peft import PeftModel

    base = tiny_model("llama")
    original = copy.deepcopy(base)
    net = attach_lora(base, LoraSettings(r=4, alpha=8.0, variant=variant), batches=[TOKENS] if variant == "lora_ga" else None)
    initial = save_initial_adapters(net, tmp_path / "initial")
    mutating = variant in ("pissa", "lora_ga")
    assert (initial is None) == (not mutating) and mutates_base(net) == mutating
    train_a_little(net, lr=0.05)
    trained = logits(net)
    assert bool(torch.isfinite(trained).all()) and (trained - logits(original)).abs().max() > 1e-2
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]

    save_adapters(net, tmp_path / "adapters", initial_dir=initial, base_name=HUB_NAME)
    torch.testing.assert_close(logits(net), trained, atol=0, rtol=0)  # the live model is untouched
    assert [n for n, p in net.named_parameters() if p.requires_grad] == trainable and list(net.peft_config) == ["default"]
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_NAME
    assert ModelCard.load(tmp_path / "adapters" / "README.md").data.base_model == HUB_NAME
    if mutating:  # a plain LoRA of rank 2r on W: s·[B | −B₀]·[A ; A₀]
        assert config["r"] == 8 and config["lora_alpha"] == 16.0 and config["init_lora_weights"] is True
    if variant != "dora":  # any LoRA tool, not only PEFT: W + s'·B'·A' from the files is the trained weight
        weights = load_file(tmp_path / "adapters" / "adapter_model.safetensors")
        s = config["lora_alpha"] / (config["r"] ** 0.5 if config["use_rslora"] else config["r"])
        for name, m in net.named_modules():
            if name.endswith(".q_proj") and hasattr(m, "get_base_layer"):
                A, B = lora_weights(m)
                want = m.get_base_layer().weight + scaling(m) * B @ A
                A1, B1 = weights[f"{name}.lora_A.weight"], weights[f"{name}.lora_B.weight"]
                W = original.get_submodule(name.split("base_model.model.", 1)[1]).weight
                torch.testing.assert_close(W + s * B1 @ A1, want.detach(), atol=1e-5, rtol=0)
    untouched = {n: p.detach().clone() for n, p in original.named_parameters()}
    reloaded = PeftModel.from_pretrained(original, tmp_path / "adapters").eval()
    torch.testing.assert_close(logits(reloaded), trained, atol=1e-4, rtol=0)
    for n, p in reloaded.get_base_model().named_parameters():  # loading must not rewrite W (PiSSA/LoRA-GA init would)
        if "lora_" not in n:
            assert torch.equal(p, untouched[n.replace(".base_layer", "")]), n
    if initial is not None:  # the folder of save_initial_adapters also works as initial_dir
        save_adapters(net, tmp_path / "again", initial_dir=tmp_path / "initial")
        assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == (
            tmp_path / "adapters" / "adapter_model.safetensors"
        ).read_bytes()


def test_save_adapters_errors(tmp_path):
    model = attach_lora(tiny_model("llama"), LoraSettings(r=4))
    save_adapters(model, tmp_path / "adapter")  # the two-argument call keeps working
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert save_initial_adapters(model, tmp_path / "initial") is None and not (tmp_path / "initial").exists()

    def one_line(call, match):
        with pytest.raises(SlimtuneError, match=match) as err:
            call()
        assert "\n" not in str(err.value)

    one_line(lambda: save_adapters(tiny_model("llama"), tmp_path / "nope"), "PeftModel returned by attach_lora")
    one_line(lambda: save_initial_adapters(tiny_model("llama"), tmp_path / "nope"), "PeftModel returned by attach_lora")
    one_line(lambda: merge_keep_masks(tiny_model("llama")), "no adapters")
    pissa = attach_lora(tiny_model("llama"), LoraSettings(r=4, variant="pissa"))
    one_line(lambda: save_adapters(pissa, tmp_path / "p"), "PiSSA.*call save_initial_adapters")
    one_line(lambda: save_adapters(pissa, tmp_path / "p", initial_dir=tmp_path / "empty"), "no initial adapter in")
    other = save_initial_adapters(attach_lora(tiny_model("llama"), LoraSettings(r=2, variant="pissa")), tmp_path / "r2")
    one_line(lambda: save_adapters(pissa, tmp_path / "p", initial_dir=other), "has r=2, alpha=16.0, not r=4")


def test_lm_head_tied_to_the_embedding_is_refused_as_a_target():
    """With tie_word_embeddings (SmolLM2), merging a LoRA on lm_head wrote B·A into the shared tensor:
    the saved model's input embedding was not the one trained with (logits off by 2.7 in the audit)."""
    from slimtune.adapters.lora import lora_targets

    tied = tiny_model("llama", tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.get_input_embeddings().weight
    with pytest.raises(SlimtuneError, match="lm_head shares its weight with the input embedding.*drop it from --lora-targets"):
        lora_targets(tied, LoraSettings(targets=["q_proj", "lm_head"]))
    assert lora_targets(tied, LoraSettings(targets=["q_proj"])) == ["q_proj"]
    untied = tiny_model("llama")
    assert lora_targets(untied, LoraSettings(targets=["q_proj", "lm_head"])) == ["q_proj", "lm_head"]
