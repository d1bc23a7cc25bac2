"""The README's figures match the code (the command reference is docs/cli.md: tests/test_reference.py)."""
import re

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_the_bad_input_count_is_the_matrix_size():
    """'The bad-input matrix (tests/test_bad_inputs.py) holds N such cases': N is its length."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bad_inputs", ROOT / "tests" / "test_bad_inputs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    stated = re.search(r"bad-input matrix\s+\(`tests/test_bad_inputs.py`\)\s+holds\s+(\d+)\s+such cases", README)
    assert stated and int(stated.group(1)) == len(mod.CASES), (stated and stated.group(1), len(mod.CASES))


def test_the_readme_is_a_landing_page_whose_links_resolve():
    """Issue 31: at most 300 lines, the two set-up commands on the first screen, every relative link a file."""
    lines = README.splitlines()
    assert len(lines) <= 300, len(lines)
    first = "\n".join(lines[:40])
    assert "make demo" in first and "make test" in first
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert len(links) >= 8
    for link in links:
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link
