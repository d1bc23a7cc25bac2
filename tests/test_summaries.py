"""inspect describes xpertctl's own artifacts; stats/select/decompose summaries (stderr, or --json on stdout);
stderr carries no blank lines."""
import json

import pytest

from conftest import stats_file
from xpertctl.io import open_checkpoint


@pytest.fixture
def chain(fx, tmp_path, cli):
    """stats -> selection -> factors -> adapted on the olmoe fixture, through the CLI."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("the law shall apply\n\nin the beginning god created the heaven")
    p = {k: tmp_path / n for k, n in [("stats", "s.safetensors"), ("sel", "sel.json"), ("factors", "f.safetensors"),
                                       ("adapted", "a.safetensors")]}
    runs = [("stats", fx / "olmoe", "-d", f"law={corpus}", "-d", f"bible={corpus}", "-o", p["stats"]),
            ("select", p["stats"], "-o", p["sel"]),
            ("decompose", fx / "olmoe", p["sel"], "--ranks", "full,full,1", "-o", p["factors"]),
            ("reshape", p["factors"], "-t", "2L,d24", "-o", p["adapted"])]
    p["stderr"] = {}
    for r in runs:
        code, out, err = cli(*r)
        assert code == 0, err
        assert out == f"{r[-1]}\n"
        p["stderr"][r[0]] = err
    return p


def test_stderr_has_no_blank_lines(chain):
    for cmd, err in chain["stderr"].items():
        assert "" not in err.splitlines(), (cmd, err)


def test_decompose_prints_per_layer_errors(chain):
    from safetensors.torch import load_file
    t = load_file(str(chain["factors"]))
    err = chain["stderr"]["decompose"]
    for layer in (0, 1, 2):
        row = next(l for l in err.splitlines() if l.strip("│ ").startswith(f"{layer} "))
        for m in ("gate", "up", "down"):
            assert f"{float(t[f'layers.{layer}.{m}.error']):.4f}" in row


def test_inspect_describes_every_artifact(chain, cli):
    from safetensors.torch import load_file
    info = json.loads(cli("inspect", chain["stats"], "--json")[1])
    assert info["kind"] == "stats" and info["family"] == "olmoe" and info["experts"] == 8 and info["top_k"] == 2
    tokens = load_file(str(chain["stats"]))["tokens"].tolist()
    assert info["domains"] == {"law": tokens[0], "bible": tokens[1]} and info["layers"] == [0, 1, 2]
    info = json.loads(cli("inspect", chain["sel"], "--json")[1])
    doc = json.loads(chain["sel"].read_text())
    assert info["kind"] == "selection" and info["criterion"] == "min"
    assert info["experts"] == {str(l["layer"]): l["experts"] for l in doc["layers"]}
    info = json.loads(cli("inspect", chain["factors"], "--json")[1])
    t = load_file(str(chain["factors"]))
    assert info["kind"] == "factors" and info["method"] == "tucker" and info["ranks"] == "full,full,1"
    assert info["errors"]["1"]["up"] == pytest.approx(float(t["layers.1.up.error"]))
    info = json.loads(cli("inspect", chain["adapted"], "--json")[1])
    assert info["kind"] == "adapted" and info["target"] == {"layers": 2, "hidden": 24, "ffn": 16}
    assert info["layer_map"] == [[0], [2]]
    for k in ("stats", "sel", "factors", "adapted"):  # and as tables
        code, out, err = cli("inspect", chain[k])
        assert code == 0 and "kind" in out, err


@pytest.mark.parametrize("cmd", ["stats", "select", "decompose"])
def test_json_summaries(chain, cli, fx, tmp_path, cmd):
    args = {"stats": ("stats", fx / "olmoe", "-d", f"a={tmp_path / 'c.txt'}", "-o", tmp_path / "o.st"),
            "select": ("select", chain["stats"], "-o", tmp_path / "o.json"),
            "decompose": ("decompose", fx / "olmoe", chain["sel"], "-o", tmp_path / "o.st")}[cmd]
    code, out, err = cli(*args, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["path"] == str(args[-1]) and doc["kind"] == {"select": "selection"}.get(cmd, cmd if cmd == "stats" else "factors")
    assert (tmp_path / args[-1].name).exists()


def test_inspect_of_an_unknown_json_is_a_one_line_error(tmp_path, cli):
    from conftest import assert_user_error
    p = tmp_path / "x.json"
    p.write_text("{}")
    code, _, err = cli("inspect", p)
    assert_user_error(code, err, "x.json", "not an xpertctl selection")


def test_model_card_is_readable(chain, cli, tmp_path):
    code, _, err = cli("graft", chain["adapted"], "-o", tmp_path / "g")
    assert code == 0, err
    card = (tmp_path / "g" / "README.md").read_text()
    row = next(l for l in card.splitlines() if l.startswith("| selection |"))
    assert row == f"| selection | min, 2 per layer from {chain['sel']} |"
    rec = json.loads(card.split("```json\n")[1].split("```")[0])
    assert rec["selection_summary"] == f"min, 2 per layer from {chain['sel']}"
    assert rec["params"]["dtype"] == "float32"
    assert "torch.float32" not in card and '\\"' not in card
