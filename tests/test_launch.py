"""Several processes, one adapter: launch.py under torchrun (gloo on a CPU here, NCCL on GPUs)."""

from __future__ import annotations

import pytest
import torch

from config.job import TrainingJob
from dataset_loader import load_tokenizer, read_dataset, tokenize_dataset
from tests.conftest import small_job
from training.launch import train_distributed
from training.request import TrainRequest
from training.runtime import Runtime


def _inputs(settings, **hyperparameters):
    job = TrainingJob.from_payload(small_job(hyperparameters=hyperparameters))
    hp = job.hyperparameters
    model_dir = settings.models_root / "tiny-llama"
    tokenizer = load_tokenizer(model_dir)
    data = tokenize_dataset(read_dataset(job.dataset, settings, seed=hp.seed), tokenizer,
                            max_seq_length=hp.max_seq_length, train_on_inputs=False)
    return model_dir, tokenizer, data, hp


def _request(model_dir, hp, output_dir, checkpoint_dir, strategy, runtime):
    return TrainRequest(model_path=model_dir, hyperparameters=hp, output_dir=output_dir,
                        checkpoint_dir=checkpoint_dir, base_model_id="org/tiny-llama", base_revision=None,
                        runtime=runtime, distributed=strategy)


@pytest.mark.slow
def test_two_ddp_processes_train_one_adapter_and_report_progress(settings, tmp_path):
    model_dir, _, data, hp = _inputs(settings, batch_size=4)
    events = []
    request = _request(model_dir, hp, tmp_path / "job", tmp_path / "ckpt", "ddp", Runtime("cpu", "fp32", "none", False))
    result = train_distributed(request, data, processes=2, on_progress=events.append)
    # 32 examples, 2 ranks × batch 4 per step: 4 steps an epoch, 2 epochs.
    assert result.metrics["steps"] == 8
    assert result.metrics["last_loss"] < result.metrics["first_loss"]
    assert [e.step for e in events][-1] == 8 and events[-1].total_steps == 8
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert sorted(result.target_modules) == sorted(
        ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])


@pytest.mark.slow
def test_an_error_in_the_ranks_comes_back_as_the_same_worker_error(settings, tmp_path):
    from errors import InputError

    model_dir, _, data, hp = _inputs(settings, target_modules=["query_key_value"])
    with pytest.raises(InputError, match=r"target_modules \['query_key_value'\] match no linear layer"):
        train_distributed(_request(model_dir, hp, tmp_path / "job", tmp_path / "ckpt", "ddp",
                                   Runtime("cpu", "fp32", "none", False)), data, processes=2)


@pytest.mark.gpu
def test_all_gpus_of_this_worker_train_with_ddp(settings, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 or more CUDA GPUs")
    model_dir, _, data, hp = _inputs(settings)
    for strategy in ("ddp", "fsdp"):
        request = _request(model_dir, hp, tmp_path / strategy, tmp_path / f"ckpt-{strategy}", strategy,
                           Runtime("cuda", "bf16", "none", False))
        result = train_distributed(request, data, processes=torch.cuda.device_count())
        assert result.metrics["last_loss"] < result.metrics["first_loss"], strategy
        assert (result.adapter_dir / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_cancel_stops_every_rank_at_the_same_step_with_a_checkpoint(settings, tmp_path):
    from errors import TrainingCancelled
    from training.checkpoints import CHECKPOINT_MARKER

    model_dir, _, data, hp = _inputs(settings, batch_size=4, epochs=20)
    with pytest.raises(TrainingCancelled, match=r"training was cancelled at step \d+ of 80"):
        train_distributed(_request(model_dir, hp, tmp_path / "job", tmp_path / "ckpt", "ddp",
                                   Runtime("cpu", "fp32", "none", False)), data, processes=2,
                          should_stop=lambda: True)
    assert len(list((tmp_path / "ckpt").glob(f"checkpoint-*/{CHECKPOINT_MARKER}"))) == 1


def test_a_failing_rank_other_than_0_writes_its_failure(settings, tmp_path, monkeypatch):
    """torchrun stops every rank as soon as one exits with an error: when rank 1 fails first, rank 0
    may never write the outcome, so rank 1 writes its own (this raced in CI: 'exited with code 1 and
    no result' instead of the ranks' error)."""
    import train_lora
    from errors import InputError
    from training.launch import RESULT_NAME, SPEC_NAME, launch_dir
    from training.result import RankOutcome

    model_dir, _, _, hp = _inputs(settings)
    request = _request(model_dir, hp, tmp_path / "job", tmp_path / "ckpt", "ddp", Runtime("cpu", "fp32", "none", False))
    work = launch_dir(request)
    work.mkdir(parents=True)
    (work / SPEC_NAME).write_text(request.model_dump_json())

    def fail(*args, **kwargs):
        raise InputError("hyperparameters.target_modules ['query_key_value'] match no linear layer")

    monkeypatch.setattr(train_lora, "load_dataset", lambda work: None)
    monkeypatch.setattr(train_lora, "train_lora", fail)
    for name, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    assert train_lora.rank_main(str(work / SPEC_NAME)) == 1
    outcome = RankOutcome.model_validate_json((work / RESULT_NAME).read_text())
    assert outcome.result is None and "query_key_value" in outcome.failure.message
