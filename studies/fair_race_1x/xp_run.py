import sys
sys.meta_path = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]
sys.path.insert(0, '/tmp/xp-snapshot')
from xpertctl.cli import main

# The guard matters: tokenize's workers are spawned, and each re-imports this file.
if __name__ == '__main__':
    sys.argv[0] = 'xpertctl'
    main()
