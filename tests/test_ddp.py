"""Data-parallel runs of slimtune's own loop (training/distributed.py), on CPU with gloo.

Two processes with micro-batch 1 must see the rows one process sees with micro-batch 2, average the
gradients before observing them, and so reach identical importance scores and masks on both ranks,
equal to the single-process masks. Only rank 0 writes; a resume loads on every rank."""

import copy
import json
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

from slimtune.adapters import LoraSettings, attach_lora
from slimtune.config import LoRAPruneConfig
from slimtune.errors import SlimtuneError
from slimtune.importance.loraprune import LoRAPruneImportance
from slimtune.importance.mask_fisher import MaskFisherImportance
from slimtune.pruning.pruner import Pruner, PruneSettings
from slimtune.training import distributed
from slimtune.training.loop import CHECKPOINT, LOG, Trainer, TrainSettings
from tests.conftest import tiny_model

TOKENS = torch.randint(0, 96, (16, 16), generator=torch.Generator().manual_seed(3))
STEPS = 6


def _config(batch_size: int, criterion: str = "loraprune", variant: str = "lora") -> LoRAPruneConfig:
    return LoRAPruneConfig(
        criterion=criterion,
        prune=PruneSettings(sparsity=0.3, prune_every=2, warmup=0.0, cooldown=0.2, exclude_layers=[0]),
        lora=LoraSettings(r=4, alpha=8, dropout=0.0, variant=variant),  # no dropout: one process and two see the same function
        train=TrainSettings(steps=STEPS, batch_size=batch_size, lr=1e-2, warmup_steps=0, checkpoint_every=2),
    )


def _prune(batch_size: int, work_dir, criterion: str = "loraprune", variant: str = "lora") -> dict:
    """prune_ on the tiny Llama; the unit scores each mask update ranked, the masks, the losses (and
    AdaLoRA's final rank pattern)."""
    from slimtune.adapters.adalora import RankBudget
    from slimtune.api import prune_

    seen, patterns = [], []
    cls = {"loraprune": LoRAPruneImportance, "mask_fisher": MaskFisherImportance}[criterion]
    original, finalize = cls.unit_scores, RankBudget.finalize

    def recording(self):
        scores = original(self)
        seen.append(scores)
        return scores

    def final_pattern(self):
        patterns.append(copy.deepcopy(self.config.rank_pattern))
        return finalize(self)

    cls.unit_scores, RankBudget.finalize = recording, final_pattern
    try:
        result = prune_(tiny_model("llama"), _config(batch_size, criterion, variant), TOKENS, work_dir=work_dir, progress=False)
    finally:
        cls.unit_scores, RankBudget.finalize = original, finalize
    return {"scores": seen, "masks": {k: v.clone() for k, v in result.masks.state_dict().items()},
            "losses": [row["loss"] for row in result.history], "rank_pattern": patterns}


def _resume_masks(tmp) -> tuple[dict, dict]:
    """Masks of an uninterrupted 4-step Trainer run and of one interrupted at step 2 and resumed."""
    def setup(folder):
        torch.manual_seed(0)
        model = attach_lora(tiny_model("llama"), LoraSettings(r=4, alpha=8, dropout=0.0))
        imp = LoRAPruneImportance(model)
        pruner = Pruner(model, PruneSettings(sparsity=0.3, prune_every=2, exclude_layers=[0]), imp, total_steps=4)
        trainer = Trainer(model, TOKENS, TrainSettings(steps=4, batch_size=1, lr=1e-2, warmup_steps=0, checkpoint_every=2),
                          imp, pruner, checkpoint_dir=folder)
        return pruner, trainer

    full_pruner, full = setup(None)
    full.run(progress=False)
    _, first = setup(tmp)
    first.s.steps = 2
    first.run(progress=False)
    resumed_pruner, resumed = setup(tmp)
    assert resumed.load_checkpoint() and resumed.step == 2
    resumed.run(progress=False)
    return full_pruner.masks.state_dict(), resumed_pruner.masks.state_dict()


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    out = _prune(1, os.path.join(tmp, "work"))
    w = distributed.current()
    out["world"] = (w.size, w.rank)
    out["resume"] = _resume_masks(os.path.join(tmp, "resume"))
    out["mask_fisher"] = _prune(1, None, "mask_fisher")  # activation statistics are all-reduced, not gradients
    out["adalora"] = _prune(1, None, "mask_fisher", "adalora")  # the rank allocator reads the averaged gradients
    torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp)), nprocs=2, join=True)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_ranks_agree_and_match_one_process_with_the_same_global_batch(two_ranks, tmp_path):
    tmp, (r0, r1) = two_ranks
    assert r0["world"] == (2, 0) and r1["world"] == (2, 1)
    # the ranks ranked identical scores (observed, not broadcast) and hold identical masks
    assert len(r0["scores"]) == len(r1["scores"]) >= 3
    for a, b in zip(r0["scores"], r1["scores"]):
        for x, y in zip(a, b):
            assert torch.equal(x["heads"], y["heads"]) and torch.equal(x["channels"], y["channels"]) and x["layer"] == y["layer"]
    assert r0["masks"].keys() == r1["masks"].keys()
    assert all(torch.equal(r0["masks"][k], r1["masks"][k]) for k in r0["masks"])
    assert r0["losses"] == r1["losses"]  # the global mean, all-reduced

    # one process, micro-batch 2: the same rows per step, so the same scores (up to rounding) and masks
    one = _prune(2, None)
    assert len(one["scores"]) == len(r0["scores"])
    for a, b in zip(one["scores"], r0["scores"]):
        for x, y in zip(a, b):
            torch.testing.assert_close(x["heads"], y["heads"], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(x["channels"], y["channels"], rtol=1e-4, atol=1e-7)
    assert one["losses"] == pytest.approx(r0["losses"], rel=1e-4)
    assert all(torch.equal(one["masks"][k], r0["masks"][k]) for k in one["masks"])
    assert any(not bool(m.all()) for m in one["masks"].values())  # something was pruned

    # rank 0 alone wrote: one log row per step, not one per rank
    rows = (tmp / "work" / LOG).read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == list(range(1, STEPS + 1))
    assert torch.load(tmp / "work" / CHECKPOINT, weights_only=False)["world_size"] == 2
    assert len(torch.load(tmp / "work" / CHECKPOINT, weights_only=False)["rng"]) == 2


def test_mask_fisher_ranks_agree_and_match_one_process(two_ranks):
    """Each rank sees other activations: the step's gate statistics are summed over ranks before the EMA."""
    _, (r0, r1) = two_ranks
    a, b = r0["mask_fisher"], r1["mask_fisher"]
    assert len(a["scores"]) >= 3 and all(torch.equal(a["masks"][k], b["masks"][k]) for k in a["masks"])
    for x, y in zip(a["scores"], b["scores"]):
        for u, v in zip(x, y):
            assert torch.equal(u["channels"], v["channels"]) and torch.equal(u["heads"], v["heads"])
    one = _prune(2, None, "mask_fisher")
    for x, y in zip(one["scores"], a["scores"]):
        for u, v in zip(x, y):
            torch.testing.assert_close(u["channels"], v["channels"], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(u["heads"], v["heads"], rtol=1e-4, atol=1e-7)
    assert all(torch.equal(one["masks"][k], a["masks"][k]) for k in one["masks"])


def test_adalora_ranks_cut_the_same_triplets(two_ranks):
    _, (r0, r1) = two_ranks
    a, b = r0["adalora"], r1["adalora"]
    assert len(a["rank_pattern"]) == 1 and a["rank_pattern"] == b["rank_pattern"]
    kept = [sum(v) for v in a["rank_pattern"][0].values()]
    assert sum(kept) == 4 * len(kept) and len(set(kept)) > 1  # the budget moved rank, identically on both ranks
    assert a["losses"] == b["losses"] and all(torch.equal(a["masks"][k], b["masks"][k]) for k in a["masks"])


def test_resume_under_two_ranks_equals_uninterrupted(two_ranks):
    _, results = two_ranks
    for r in results:
        full, resumed = r["resume"]
        assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert all(torch.equal(results[0]["resume"][0][k], results[1]["resume"][0][k]) for k in results[0]["resume"][0])


def test_resume_with_another_world_size_warns_and_follows_the_global_batch(tmp_path, capsys):
    def trainer():
        torch.manual_seed(0)
        model = attach_lora(tiny_model("llama", num_hidden_layers=2), LoraSettings(r=2, alpha=4))
        return Trainer(model, TOKENS, TrainSettings(steps=4, batch_size=2, lr=1e-2, lr_base_batch=2, warmup_steps=0, checkpoint_every=2),
                       checkpoint_dir=tmp_path)

    first = trainer()
    first.s.steps = 2
    first.run(progress=False)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    state["world_size"] = 4  # as if written by 4 processes: global batch 8, lr 2x (sqrt rule)
    for group in state["optimizer"]["param_groups"]:
        group["lr"] *= 2
        group["initial_lr"] *= 2
    state["scheduler"]["base_lrs"] = [lr * 2 for lr in state["scheduler"]["base_lrs"]]
    torch.save(state, tmp_path / CHECKPOINT)
    resumed = trainer()
    assert resumed.load_checkpoint()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "4-process checkpoint with 1 process" in err[0] and "from 8 to 2 sequences" in err[0]
    assert resumed.opt.param_groups[0]["initial_lr"] == pytest.approx(1e-2)
    assert resumed.opt.param_groups[0]["lr"] == pytest.approx(1e-2 * resumed.sched.lr_lambdas[0](2))


def test_multi_process_launch_without_accelerate_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "_world", None)
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import fails
    with pytest.raises(SlimtuneError, match=r"WORLD_SIZE=2\) and that needs accelerate; pip install accelerate") as exc:
        distributed.setup()
    assert "\n" not in str(exc.value)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.setup() is distributed.SINGLE and distributed.is_main()
