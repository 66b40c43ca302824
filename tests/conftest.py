import sys
from pathlib import Path

# Let test modules import the shared helpers as `helpers`.
sys.path.insert(0, str(Path(__file__).parent))
