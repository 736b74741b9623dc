"""PreferenceConfig(reference="bema"): the preference trainer's reference moves by
pyalign.refmodel.BEMA on the bema_* schedule (TRL's BEMACallback settings), its state goes into
the checkpoints, and a run resumed from one is bit-identical to a straight one; bad bema_* values
are named by their config keys."""
import pytest
import torch
from trainer_helpers import read_records, strip_timing

SMALL = dict(batch_size=2, micro_batch_size=2, eval_every=1, eval_batch_size=2, final_eval_batch_size=2,
             num_examples=4, precompute_ref=False, progress=False)
BEMA = dict(reference="bema", bema_update_freq=2, bema_update_after=1, bema_lag=2)


def trainer(tiny_task, out_dir, **overrides):
    from pyalign.trainers import PreferenceConfig, PreferenceTrainer
    config = PreferenceConfig(**SMALL, **BEMA, checkpoint_every=1, **overrides)
    return PreferenceTrainer(tiny_task, config, out_dir=str(out_dir))


def test_bema_reference_moves_on_schedule_and_resumes_exactly(tiny_task, tmp_path):
    from pyalign.refmodel import BEMA as Strategy
    straight = trainer(tiny_task, tmp_path / "straight")
    assert isinstance(straight.ref_strategy, Strategy) and straight.ref_model is not straight.init_model
    straight.train(4)
    records = [strip_timing(r) for r in read_records(tmp_path / "straight")]
    assert [r["reference_updated"] for r in records[:4]] == [False, False, True, False]

    first = trainer(tiny_task, tmp_path / "pieces")
    first.train(2)
    resumed = trainer(tiny_task, tmp_path / "pieces")
    resumed.train(4, resume=True)
    assert [strip_timing(r) for r in read_records(tmp_path / "pieces")] == records
    for name, tensor in straight.ref_model.state_dict().items():
        assert torch.equal(resumed.ref_model.state_dict()[name], tensor), name
    assert not torch.equal(straight.ref_model.state_dict()["lm_head.weight"],
                           straight.init_model.state_dict()["lm_head.weight"])


@pytest.mark.parametrize("key,value,message", [
    ("bema_update_freq", 0, "config: bema_update_freq must be an int >= 1"),
    ("bema_min_ema_multiplier", 1.5, r"config: bema_min_ema_multiplier must be in \[0, 1\]"),
    ("reference", "ema", "config key 'reference' must be one of"),
])
def test_bad_bema_settings_are_named(key, value, message):
    from pyalign.trainers import PreferenceConfig
    with pytest.raises(ValueError, match=message):
        PreferenceConfig(**{**BEMA, key: value}).validate()
