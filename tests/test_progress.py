"""Progress in logs: a line per 5 % instead of a redraw per update."""

import io

from caco_jax.runtime import progress


def test_log_progress_prints_a_line_per_twentieth_and_at_the_end():
    out = io.StringIO()
    bar = progress.LogProgress(total=1000, desc="pretrain", unit="step", file=out)
    for _ in range(1000):
        bar.update(1)
    bar.set_postfix(loss="1.234")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 20  # 5 %, 10 %, ..., 100 %: not one per step
    assert lines[0].startswith("pretrain:   5% 50/1000 step")
    assert lines[-1].startswith("pretrain: 100% 1000/1000 step")


def test_log_progress_ends_on_its_total_and_iterates_generators():
    out = io.StringIO()
    bar = progress.LogProgress(total=7, desc="x", file=out)
    bar.update(7)  # 7 is not a multiple of the 5 % step (1 here): still one line for the end
    assert out.getvalue().splitlines()[-1].startswith("x: 100% 7/7")
    out = io.StringIO()
    items = list(progress.LogProgress((i for i in range(3)), desc="g", file=out))
    assert items == [0, 1, 2]
    lines = out.getvalue().splitlines()  # no total: one line when it closes
    assert len(lines) == 1 and lines[0].startswith("g: 3 it")


def test_bar_is_a_log_progress_when_stderr_is_not_a_terminal(capsys):
    bar = progress.bar(total=10, desc="d")  # pytest captures stderr: not a terminal
    assert isinstance(bar, progress.LogProgress)
    bar.close()
