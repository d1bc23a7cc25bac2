"""bench/run_all.py rewrites only its own block of bench/RESULTS.md: the hand-written sections stay."""
import importlib.util

from conftest import ROOT


def _run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "bench" / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_all_keeps_hand_written_sections(tmp_path):
    ra = _run_all()
    res = tmp_path / "RESULTS.md"
    hand = "# Benchmark results\n\nBefore/after, measured by hand: 106.3 s.\n\n## Notes\n\n- shared machine\n"
    res.write_text(hand)
    ra.write("## Every benchmark\n\n- graft: 101.0 s\n", res)
    first = res.read_text()
    assert first.startswith(hand) and first.count(ra.BEGIN) == 1 and "- graft: 101.0 s" in first
    res.write_text(first + "\n## Added later by hand\n\ntext after the block\n")
    ra.write("## Every benchmark\n\n- graft: 99.5 s\n", res)
    second = res.read_text()
    assert second.startswith(hand) and second.count(ra.BEGIN) == second.count(ra.END) == 1
    assert "- graft: 99.5 s" in second and "101.0 s" not in second
    assert second.endswith("## Added later by hand\n\ntext after the block\n")


def test_the_committed_results_survive_a_run():
    ra = _run_all()

    def outside(text):  # the text without the script's block
        return text.split(ra.BEGIN)[0] + text.split(ra.END, 1)[1] if ra.BEGIN in text else text
    real = (ROOT / "bench" / "RESULTS.md").read_text()
    merged = ra.merge(real, "## Every benchmark\n\n- x\n")
    hand = [l for l in outside(real).splitlines() if l.strip()]
    assert len(hand) > 50 and sum(l.startswith("## ") for l in hand) >= 5  # the hand-written sections
    assert [l for l in outside(merged).splitlines() if l.strip()] == hand
