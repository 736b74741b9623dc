"""``TrainerConfig.backend`` reaches every pyalign op a trainer calls: the scorer's log-prob ops,
the preference loss, ``kl_penalty`` and the reference strategies' weight ops all ask the backend
table for the configured backend, never for "auto" (which PYALIGN_BACKEND would redirect)."""
import pytest

from pyalign import backends


@pytest.fixture
def requested(monkeypatch):
    """(op family, backend name) of every backend resolution while the test runs."""
    monkeypatch.delenv("PYALIGN_BACKEND", raising=False)
    calls = []
    resolve = backends.resolve

    def recording_resolve(family, backend, device):
        calls.append((family, backend))
        return resolve(family, backend, device)

    monkeypatch.setattr(backends, "resolve", recording_resolve)
    return calls


SMALL = dict(batch_size=2, micro_batch_size=2, eval_every=1, eval_batch_size=2, final_eval_batch_size=2,
             backend="eager", progress=False)


@pytest.mark.parametrize("fused_linear", [True, False])
def test_preference_trainer_runs_every_op_on_the_configured_backend(tiny_task, requested, fused_linear):
    from pyalign.trainers import PreferenceConfig, PreferenceTrainer
    config = PreferenceConfig(reference="trust_region", tr_tau=1, num_examples=4, precompute_ref=False,
                              fused_linear=fused_linear, **SMALL)
    PreferenceTrainer(tiny_task, config).train(1)
    logprobs = "linear_logprobs" if fused_linear else "logprobs"
    assert {family for family, _ in requested} >= {logprobs, "preference", "kl", "weights"}
    assert {backend for _, backend in requested} == {"eager"}


def test_rl_trainer_runs_every_op_on_the_configured_backend(tiny_task, requested):
    from pyalign.trainers import RLConfig, RLTrainer
    config = RLConfig(samples_per_prompt=2, elastic_reset=True, er_reset_every=1, **SMALL)
    RLTrainer(tiny_task, config).train(1)
    assert {family for family, _ in requested} >= {"linear_logprobs", "kl", "weights"}
    assert {backend for _, backend in requested} == {"eager"}


def test_unknown_backend_is_refused():
    from pyalign.trainers import TrainerConfig
    with pytest.raises(ValueError, match="'backend' must be one of"):
        TrainerConfig(backend="fortran").validate()
