"""Training in several processes: 2 CPU processes over gloo (``accelerate launch``) against 1, same global batch.

The module is also the script the processes run (``python tests/test_distributed_training.py OUT``): every
scenario below trains a tiny random-init Llama for a few steps and writes its output; the test launches it
once with 2 processes and once with 1 and compares weights and losses. The data have equal lengths, so each
process's share of a micro-batch weighs the same and 2 processes must reproduce the 1-process gradients; the
RMU scenario has unequal lengths and is compared with the 1-process run that takes the same halves one after
the other (batch_size 2, grad_accum 2), which is what 2 processes average.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "training" / "configs"
ATOL = 1e-5


# ---- the scenarios (run inside the launched processes) -------------------------------------------------------

def _equal_length(pairs: list[tuple[str, str]], tok, k: int = 8) -> list[tuple[str, str]]:  # noqa: ANN001
    """The first ``k`` (question, answer) pairs whose encodings share one length and one answer length."""
    from collections import defaultdict

    from core.generation import encode_qa

    groups: dict[tuple[int, int], list[tuple[str, str]]] = defaultdict(list)
    for q, a in pairs:
        e = encode_qa(tok, q, a)
        groups[(len(e["input_ids"]), sum(x != -100 for x in e["labels"]))].append((q, a))
    best = max(groups.values(), key=len)
    assert len(best) >= k, {g: len(v) for g, v in groups.items()}
    return best[:k]


def _qa_items(tok) -> list:  # noqa: ANN001
    """Eight QA facts whose encodings all have the same length and the same answer length."""
    from core.schema import QAItem

    pairs = [(f"Where was person {i} born?", f"Person {i} was born in town {i}.") for i in range(60)]
    return [QAItem(question=q, answer=a) for q, a in _equal_length(pairs, tok)]


def _paired_streams(tok):  # noqa: ANN001, ANN202
    """Forget and retain streams of equal-length QA examples, paired as unlearning batches are."""
    from training.unlearn import PairedStreams, qa_example

    forget = _equal_length([(f"Where was person {i} born?", f"Person {i} was born in town {i}.") for i in range(60)],
                           tok)
    retain = _equal_length([(f"Where does person {i} live?", f"Person {i} lives in city {i}.") for i in range(60)],
                           tok)
    return PairedStreams({"forget": [qa_example(tok, q, a, group=0) for q, a in forget],
                          "retain": [qa_example(tok, q, a) for q, a in retain]}, seed=0)


def _ga_loss(model, batch):  # noqa: ANN001, ANN202
    """Gradient ascent on the forget NLL plus the retain NLL (a forget part and a retain part, for GRU and SAM)."""
    from training.losses import mean_nll

    f = -mean_nll(model, batch["forget"])
    r = mean_nll(model, batch["retain"])
    return {"loss": f + r, "forget_loss": f, "retain_nll": r}


def _digest(model) -> dict[str, float]:  # noqa: ANN001
    """Per-tensor sums of a model's weights, to check that every process holds the same replica."""
    return {n: float(p.detach().double().sum()) for n, p in model.named_parameters()}


def run_scenarios(out: Path) -> None:
    """Train every scenario into ``out`` (called the same way in every launched process)."""
    from core.models import tiny_llm
    from eval.tasks.offline import BenchmarkConfig, generate_benchmark
    from training.finetune import FinetuneConfig, finetune
    from training.loop import TrainConfig, train
    from training.methods.common import collate_streams
    from training.optim import OptimConfig
    from training.unlearn import UnlearnConfig, unlearn

    # From the launcher's environment: an accelerate state made here first (without cpu=True) would pin "one process".
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    report: dict = {"world": world, "rank": rank}

    # 1. finetune (plain AdamW path), 6 steps of batch 4 x accumulation 2, and an interrupted run resumed.
    ft = FinetuneConfig(train=TrainConfig(lr=1e-3, max_steps=6, batch_size=4, grad_accum=2, save_every=2,
                                          warmup_ratio=0.0))
    llm = tiny_llm(0)
    res = finetune(llm.model, llm.tokenizer, _qa_items(llm.tokenizer), ft, out / "finetune")
    report["finetune"] = {"history": res.history, "digest": _digest(llm.model)}
    cut = tiny_llm(0)
    part = finetune(cut.model, cut.tokenizer, _qa_items(cut.tokenizer), ft, out / "resumed", stop_after=3)
    again = tiny_llm(0)  # a relaunch starts from the base weights again
    res = finetune(again.model, again.tokenizer, _qa_items(again.tokenizer), ft, out / "resumed")
    report["resumed"] = {"stopped_at": part.steps, "resumed_from": res.resumed_from, "history": res.history}

    # 2. optim options (GRU + SAM + SalUn mask) through RobustStep.
    llm = tiny_llm(0)
    pad = llm.tokenizer.pad_token_id
    res = train(llm.model, llm.tokenizer, _paired_streams(llm.tokenizer), lambda b: collate_streams(b, pad), _ga_loss,
                TrainConfig(lr=1e-3, max_steps=4, batch_size=4, grad_accum=2, save_every=2, warmup_ratio=0.0),
                out / "optim", optim=OptimConfig(rectify="gru", sam="sam", mask="salun:0.5"))
    report["optim"] = {"history": res.history, "digest": _digest(llm.model)}

    # 3. RMU (its own truncated forwards and cached layer inputs) on unequal lengths: 2 processes x 2 examples
    #    against 1 process taking the two halves in turn.
    task = generate_benchmark(BenchmarkConfig(num_people=6, neighbours_per_forget=1, hazard_facts=4, holdout_people=0))
    llm = tiny_llm(0, num_layers=2)
    rmu = UnlearnConfig(method="rmu", params={"layer": 1, "alpha": 10.0}, max_retain=8,
                        cache_dir=str(out / "cache"),
                        train=TrainConfig(lr=5e-3, max_steps=3, batch_size=2 * world if world > 1 else 2,
                                          grad_accum=1 if world > 1 else 2, save_every=2))  # 12 of its 14 pairs
    res = unlearn(llm.model, llm.tokenizer, task, rmu, out / "rmu")
    report["rmu"] = {"history": res.train.history}

    # 4. A loss with state of its own (PDU's dual variable) is refused in several processes.
    if world > 1:
        llm = tiny_llm(0, num_layers=2)
        try:
            unlearn(llm.model, llm.tokenizer, task, UnlearnConfig(method="pdu", max_retain=8,
                                                                  train=TrainConfig(max_steps=1, batch_size=4)),
                    out / "pdu")
            report["pdu_error"] = None
        except ValueError as e:
            report["pdu_error"] = str(e)
    (out / f"rank{rank}.json").write_text(json.dumps(report))


# ---- the test ---------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(out: Path, processes: int) -> float:
    """Run this module under ``accelerate launch`` with ``processes`` CPU processes; returns the wall time."""
    out.mkdir(parents=True)
    flags = (["--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(_free_port())]
             if processes > 1 else ["--cpu", "--num_processes", "1"])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", __file__, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return time.perf_counter() - t0


def _weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _losses(history: list[dict]) -> list[float]:
    return [h["loss"] for h in history]


@pytest.mark.slow
def test_two_processes_train_as_one_at_the_same_global_batch(tmp_path):
    wall2 = _launch(tmp_path / "two", 2)
    wall1 = _launch(tmp_path / "one", 1)
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    two = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    assert one["world"] == 1 and [t["world"] for t in two] == [2, 2] and [t["rank"] for t in two] == [0, 1]

    measured = {}
    for name in ("finetune", "optim", "rmu"):
        diff = _max_diff(_weights(tmp_path / "one" / name), _weights(tmp_path / "two" / name))
        l1, l2 = _losses(one[name]["history"]), _losses(two[0][name]["history"])
        measured[name] = {"max_weight_diff": diff, "final_loss_1proc": l1[-1], "final_loss_2proc": l2[-1]}
        assert diff <= ATOL, (name, diff)
        if name != "rmu":  # rmu in 1 process reports its last half-batch, in 2 the mean of both halves
            assert l1 == pytest.approx(l2, abs=ATOL), (name, l1, l2)
        assert two[1][name]["history"] == two[0][name]["history"], name  # every process reports the global terms
    for name in ("finetune", "optim"):  # the replicas stay identical: the gradients were averaged over processes
        assert two[0][name]["digest"] == two[1][name]["digest"], name
    # Resume after an interruption in 2 processes: the last checkpoint (step 2), then the same weights as straight.
    resumed = two[0]["resumed"]
    assert resumed["stopped_at"] == 3 and resumed["resumed_from"] == 2
    assert _max_diff(_weights(tmp_path / "two" / "finetune"), _weights(tmp_path / "two" / "resumed")) <= ATOL
    assert _losses(resumed["history"]) == pytest.approx(_losses(two[0]["finetune"]["history"]), abs=ATOL)
    assert not (tmp_path / "two" / "finetune.ckpt").exists()
    assert "PDU" in (two[0]["pdu_error"] or "") and two[1]["pdu_error"] == two[0]["pdu_error"]
    print(json.dumps({"wall_s": {"2proc": round(wall2, 1), "1proc": round(wall1, 1)}, **measured}))


# ---- cheap checks, no processes ----------------------------------------------------------------------------------

def test_shards_cover_the_micro_batch_and_weigh_its_examples():
    from training.loop import _shard

    for n in (1, 3, 4, 5, 8):
        for world in (1, 2, 3):
            parts = [_shard(list(range(n)), r, world) for r in range(world)]
            real = [p for p, w in parts if w > 0]
            assert [i for p in real for i in p] == list(range(n))
            assert sum(w for _, w in parts) == pytest.approx(world)
            assert all(w == 1.0 for _, w in parts) == (n % world == 0)


def test_settings_refused_in_several_processes_name_what_is_accepted():
    from training.loop import TrainConfig, check_processes
    from training.optim import OptimConfig

    class Stateful:
        def __call__(self, model, batch):  # noqa: ANN001, ANN204
            return {}

        def state_dict(self):  # noqa: ANN202
            return {}

    plain = TrainConfig(batch_size=4)
    check_processes(plain, _ga_loss, OptimConfig(rectify="gru"), 2, "MULTI_CPU")  # options work under DDP-style
    check_processes(plain, Stateful(), None, 1, "NO")
    with pytest.raises(ValueError, match="at least 4"):
        check_processes(TrainConfig(batch_size=2), _ga_loss, None, 4, "MULTI_GPU")
    with pytest.raises(ValueError, match="PDU's dual"):
        check_processes(plain, Stateful(), None, 2, "MULTI_CPU")
    with pytest.raises(ValueError, match=r"optim options \{'sam': 'sam'\}.*accelerate launch --multi_gpu"):
        check_processes(plain, _ga_loss, OptimConfig(sam="sam"), 2, "FSDP")
    with pytest.raises(ValueError, match="train.lora"):
        check_processes(plain.model_copy(update={"lora": {"r": 4}}), _ga_loss, None, 2, "DEEPSPEED")
    with pytest.raises(ValueError, match="not XLA"):
        check_processes(plain, _ga_loss, None, 2, "XLA")


@pytest.mark.parametrize("name", ["accelerate_fsdp.yaml", "accelerate_zero3.yaml"])
def test_shipped_gpu_configs_parse_as_accelerate_configs(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(CONFIGS / name))  # unknown keys raise here
    assert not cfg.use_cpu and cfg.num_machines == 1 and cfg.mixed_precision == "no"
    if name == "accelerate_fsdp.yaml":
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        from core.models import tiny_llm

        fsdp = cfg.fsdp_config
        assert cfg.distributed_type == "FSDP"
        assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD" and fsdp["fsdp_version"] == 1
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and fsdp["fsdp_use_orig_params"] is True
        layer = fsdp["fsdp_transformer_layer_cls_to_wrap"]
        assert layer == LlamaDecoderLayer.__name__
        assert any(type(m).__name__ == layer for m in tiny_llm(0).model.modules())
    else:
        ds = cfg.deepspeed_config
        assert cfg.distributed_type == "DEEPSPEED"
        assert ds["zero_stage"] == 3 and ds["zero3_save_16bit_model"] is True
        assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds  # the loop sets them


if __name__ == "__main__":
    run_scenarios(Path(sys.argv[1]))


def test_only_the_main_process_evaluates_and_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """`train` / `finetune` under a launcher: RANK (set by accelerate launch and torchrun) names the one that reports."""
    from training.loop import is_main_process

    monkeypatch.delenv("RANK", raising=False)
    assert is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()
