"""The engine's promises: no pruning by index, checks before work, the one-verb API, honest figures."""

import pytest
import torch

import slimtune
from slimtune.api import check_config, prune_
from slimtune.config import LoRAPruneConfig, OneShotConfig
from slimtune.errors import SlimtuneError
from slimtune.importance.base import Importance
from slimtune.pruning.pruner import Pruner, PruneSettings
from slimtune.training.loop import TrainSettings
from tests.conftest import tiny_model

TOKENS = torch.randint(0, 96, (16, 16), generator=torch.Generator().manual_seed(5))


def _config(cls=LoRAPruneConfig, targets=None, **prune):
    return cls(prune=PruneSettings(**{"sparsity": 0.3, "exclude_layers": [0], **prune}),
               lora=slimtune.LoraSettings(r=4, alpha=8, targets=targets, dropout=0.0),
               train=TrainSettings(steps=6, batch_size=2, warmup_steps=0, checkpoint_every=0),
               **({"criterion": "taylor"} if cls is OneShotConfig else {}))


def test_loraprune_without_mlp_adapters_is_refused_before_work():
    """Defect 1: with adapters on q and v only, every channel scored 0 and went by index."""
    model = tiny_model("llama")
    config = _config(targets=["q_proj", "v_proj"])
    with pytest.raises(SlimtuneError, match="cannot score channels.*gate_proj,up_proj,down_proj.*--lora-targets") as err:
        check_config(model, config)
    assert "\n" not in str(err.value)
    assert not hasattr(model, "peft_config")  # nothing was attached
    # heads alone are scored from the q and v adapters: allowed
    check_config(model, _config(targets=["q_proj", "v_proj"], granularity="heads", sparsity=0.15))


def test_block_influence_cannot_score_heads_or_channels():
    """Defect 2: a layer-level criterion with the default heads,channels used to prune heads 0-2 by index."""
    with pytest.raises(SlimtuneError, match="'block_influence' cannot score heads, channels \\(it scores layers\\); pass --granularity layers"):
        OneShotConfig(criterion="block_influence", prune=PruneSettings(granularity="heads,channels"))
    with pytest.raises(SlimtuneError, match="'block_influence' cannot score channels \\(it scores layers\\)"):
        OneShotConfig(criterion="block_influence")  # the default granularity
    OneShotConfig(criterion="block_influence", prune=PruneSettings(granularity="layers"))
    with pytest.raises(SlimtuneError, match="cannot score weights"):
        OneShotConfig(criterion="block_influence", prune=PruneSettings(granularity="unstructured"))


class _Flat(Importance):
    """A criterion whose channel scores are all `value`: selection among them is by index."""

    name = "flat"

    def __init__(self, model, value=0.0):
        super().__init__(model)
        self.value = value

    def element_scores(self):
        from slimtune.importance.base import projection_weights

        out = {}
        for i, path, w in projection_weights(self.model, self.spec):
            keep_heads = path not in self.spec.mlp_in and path != self.spec.mlp_out
            out.setdefault(i, {})[path] = torch.rand(w.shape) if keep_heads else torch.full(w.shape, self.value)
        return out


@pytest.mark.parametrize("value, word", [(0.0, "all zero"), (0.5, "all equal")])
def test_ties_are_refused_not_pruned_by_index(value, word):
    """Defect 3: missing, all-zero or all-equal scores are refused with a one-line error."""
    model = tiny_model("llama")
    pruner = Pruner(model, PruneSettings(sparsity=0.3, exclude_layers=[0], normalise="none"), _Flat(model, value))
    with pytest.raises(SlimtuneError, match=f"'flat' gives {word} channel scores in layer 1") as err:
        pruner.finalize()
    assert "\n" not in str(err.value)
    assert all(bool(pruner.masks.channels(i).all()) for i in range(4))  # nothing was pruned
    # heads alone are fine: their scores are random, not tied
    model = tiny_model("llama")
    Pruner(model, PruneSettings(sparsity=0.1, granularity="heads", exclude_layers=[0]), _Flat(model, value)).finalize()


def test_random_criterion_is_allowed():
    model = tiny_model("llama")
    result = prune_(model, OneShotConfig(criterion="random", recover_steps=0, prune=PruneSettings(sparsity=0.3, exclude_layers=[0])))
    assert result.sparsity["achieved"] == pytest.approx(0.3, abs=0.02)


def test_checks_run_before_work():
    model = tiny_model("llama")
    with pytest.raises(SlimtuneError, match="fp16 autocast needs a GPU"):
        check_config(model, LoRAPruneConfig(train=TrainSettings(mixed_precision="fp16")))
    with pytest.raises(SlimtuneError, match="N:M pattern 5:4 is invalid"):
        PruneSettings(granularity="nm", nm="5:4")
    with pytest.raises(SlimtuneError, match="not a multiple of 3"):
        check_config(tiny_model("llama", intermediate_size=80), _config(granularity="nm", nm="2:3"))
    with pytest.raises(SlimtuneError, match="DoRA"):
        LoRAPruneConfig(prune=PruneSettings(granularity="unstructured"), lora=slimtune.LoraSettings(variant="dora"))
    with pytest.raises(SlimtuneError, match="criterion 'taylor' is one-shot; use OneShotConfig"):
        LoRAPruneConfig(criterion="taylor")


def test_prune_verb_and_shortfall_is_reported():
    """The one verb; a target the units cannot hit exactly reports its shortfall (defect 6)."""
    model = tiny_model("llama")
    config = OneShotConfig(criterion="magnitude", recover_steps=0, prune=PruneSettings(sparsity=0.27, granularity="layers"))
    result = slimtune.prune_(model, config)
    sp = result.sparsity
    assert sp["achieved"] == pytest.approx(0.25, abs=0.01)  # one of the two prunable layers of four
    assert sp["shortfall"] == pytest.approx(0.27 - sp["achieved"])
    assert model.config.num_hidden_layers == 3


def test_unknown_config_type_is_refused():
    class Other:
        pass

    with pytest.raises(SlimtuneError, match="no pruning method is registered for Other"):
        prune_(tiny_model("llama"), Other())


@pytest.mark.parametrize("change, match", [
    ({"criterion": "grad"}, "criterion 'grad' reads the full weight gradients.*criterion 'loraprune'"),
    ({"criterion": "movement_grad"}, "criterion 'movement_grad'.*criterion 'movement'"),
    ({"distill": slimtune.DistillSettings(enabled=True)}, "cannot apply --distill inside"),
    ({"averaging": slimtune.AveragingSettings(ema=0.9, export="ema")}, "cannot apply --ema / --swa inside"),
    ({"train": TrainSettings(steps=6, lora_pro=True, lora_plus_ratio=16)}, "cannot apply --lora-pro, --lora-plus-ratio inside.*B matrices"),
])
def test_session_refuses_what_a_trainer_callback_cannot_apply(change, match):
    """These ran silently before: the grad criteria put every base weight into the Trainer's
    optimiser (full fine-tuning, and W0's gradients in the clipping norm); distillation, averaging,
    LoRA-Pro and LoRA+ were never applied."""
    from dataclasses import replace

    with pytest.raises(SlimtuneError, match=match):
        slimtune.PruneSession(tiny_model("llama"), replace(_config(), **change), total_steps=6)


def test_session_in_a_trainer_matches_prune_(tmp_path):
    """The Trainer-callback path (three calls) reaches the same masks as slimtune's own loop on the
    same batches: one step order, written once (defect 8)."""
    from torch.utils.data import IterableDataset
    from transformers import Trainer, TrainingArguments

    from slimtune.data import batch_at

    config = _config(sparsity=0.3)
    ref = prune_(tiny_model("llama"), config, TOKENS, progress=False)

    class Batches(IterableDataset):  # the exact rows prune_'s loop draws, in its order
        def __iter__(self):
            for step in range(config.train.steps):
                for row in batch_at(TOKENS, config.train.batch_size, config.train.seed, step):
                    yield {"input_ids": row, "labels": row}

    session = slimtune.PruneSession(tiny_model("llama"), config, total_steps=config.train.steps)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=config.train.steps,
                             learning_rate=config.train.lr, lr_scheduler_type=config.train.lr_schedule, warmup_steps=0,
                             max_grad_norm=1.0, weight_decay=0.0, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    Trainer(model=session.model, args=args, train_dataset=Batches(), callbacks=[session.callback]).train()
    result = session.finish()
    assert result.sparsity["achieved"] == pytest.approx(ref.sparsity["achieved"])
    for a, b in zip(ref.masks.buffers(), result.masks.buffers()):
        assert torch.equal(a, b)
