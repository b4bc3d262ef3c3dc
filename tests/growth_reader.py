"""Poll a store with consolidated metadata, a fresh open each time, until STOPFILE exists.

Prints JSON: page counts seen, number of polls, and every error (a reader must never fail).
"""
import json
import os
import sys
import time
import warnings

import xarray as xr

warnings.simplefilter("ignore")
store, stopfile = sys.argv[1], sys.argv[2]
sizes, errors, polls = set(), [], 0
t0 = time.time()
while not os.path.exists(stopfile) and time.time() - t0 < 120:
    try:
        ds = xr.open_zarr(store, consolidated=True)
        status = ds["status"].values
        n = ds.sizes["page"]
        assert all(ds[v].shape[0] == n for v in ds.data_vars), "arrays disagree on the page count"
        assert len(status) == n
        sizes.add(int(n))
        if polls == 0:
            open(stopfile + ".ready", "w").close()
    except Exception as exc:  # noqa: BLE001 - what the test counts
        errors.append(f"{type(exc).__name__}: {exc}")
    polls += 1
print(json.dumps({"sizes": sorted(sizes), "polls": polls, "errors": errors[:10], "n_errors": len(errors)}))
