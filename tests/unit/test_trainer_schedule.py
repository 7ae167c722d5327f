"""python -m pytest tests/unit/test_trainer_schedule.py  (a resumed run whose TRAIN_ITERS changed says so)"""

from types import SimpleNamespace

from train.trainer import schedule_change

COSINE = SimpleNamespace(schedule="cosine", lr=1e-3, min_lr=1e-5, warmup_iters=10)


def test_extending_train_iters_on_resume_names_old_and_new_values():
    message = schedule_change({"train_iters": 100}, 200, 50, COSINE)
    assert "TRAIN_ITERS changed on resume: 100 -> 200" in message and "cosine" in message
    before, after = message.rsplit(" ", 3)[1], message.rsplit(" ", 1)[1]
    assert float(before) < float(after)  # halfway down the short schedule, a quarter down the long one


def test_same_length_or_an_old_checkpoint_says_nothing():
    assert schedule_change({"train_iters": 200}, 200, 50, COSINE) is None
    assert schedule_change(None, 200, 50, COSINE) is None
