"""Old name of tracking/mlflow/offline.py: runs made before the move printed
`python -m mlxlab.tracking.offline <spool>` as the way to send a spool later, which still works."""

import sys

from mlxlab.tracking.mlflow.offline import main

if __name__ == "__main__":
    sys.exit(main())
