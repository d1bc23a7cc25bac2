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
