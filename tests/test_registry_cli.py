"""Registries, aliases, unknown-name errors and the list command."""
import pytest

from peftbench._registry import Registry
from peftbench.cli import main
from peftbench.errors import UnknownNameError
from peftbench.methods import METHODS, get_method
from peftbench.tasks import SUITES, get_suite, get_task


def test_alias_vpt_is_vpt_deep():
    assert get_method("vpt") is get_method("vpt-deep")
    assert METHODS.canonical("VPT_Deep") == "vpt-deep"


def test_unknown_name_lists_known_and_suggests_closest():
    with pytest.raises(UnknownNameError) as exc:
        get_method("vpt-deeep")
    msg = str(exc.value)
    assert "Did you mean 'vpt-deep'" in msg
    assert "linear" in msg and "full" in msg
    with pytest.raises(UnknownNameError, match="Did you mean 'eurosat'"):
        get_task("eurosta")
    with pytest.raises(UnknownNameError, match="unknown suite"):
        get_suite("vtab2000x")


def test_task_aliases_and_groups():
    assert get_task("cifar").name == "cifar100"
    assert get_task("kitti").num_classes == 4
    vtab = get_suite("vtab")
    groups = [get_task(t).group for t in vtab.tasks]
    assert (groups.count("natural"), groups.count("specialized"), groups.count("structured")) == (7, 4, 8)
    assert len(get_suite("fgvc").tasks) == 5
    assert "demo" in SUITES


def test_registry_rejects_duplicates_and_alias_collisions():
    r = Registry("thing")
    r.add("a", 1, aliases=("x",))
    with pytest.raises(ValueError):
        r.add("a", 2)
    with pytest.raises(ValueError):
        r.add("b", 2, aliases=("a",))


@pytest.mark.parametrize("what,expected", [("methods", "vpt-deep"), ("tasks", "eurosat"), ("suites", "vtab"),
                                           ("protocols", "fixed")])
def test_list_prints_one_line_descriptions(capsys, what, expected):
    assert main(["list", what]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.split()[0 if what != "tasks" else 1] == expected)
    assert len(line.split()) > 2  # name + description


def test_cli_unknown_method_is_a_clear_error(capsys):
    assert main(["run", "--methods", "linaer", "--suite", "demo"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'linaer'" in err and "Did you mean 'linear'" in err


def test_run_summary_columns_stay_aligned_for_long_names():
    import io

    from peftbench.sweep.drive import print_summary

    rows = [
        {"config": "linear", "task": "demo_dsprites_loc", "top1": 63.6, "std": None, "n": 1,
         "tuned_pct": 0.114, "failed": 0, "error": None},
        {"config": "linear@demo-vit-random", "task": "demo_digits", "top1": 9.5, "std": 1.25, "n": 3,
         "tuned_pct": 0.142, "failed": 1, "error": None},
    ]
    out = io.StringIO()
    print_summary(rows, file=out)
    lines = out.getvalue().splitlines()
    # the top1 column ends at the same offset on every line, header included
    ends = [line.index("top1") + 4 for line in lines[:1]]
    ends += [line.index("63.60") + 5 for line in lines[2:3]] + [line.index("9.50") + 4 for line in lines[3:4]]
    assert len(set(ends)) == 1, lines
    assert lines[3].endswith("1 failed/diverged")
