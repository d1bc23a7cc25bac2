import sys
sys.meta_path = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]
sys.path.insert(0, '/tmp/xp-snapshot')
from xpertctl.cli import main
sys.argv[0] = 'xpertctl'
main()
