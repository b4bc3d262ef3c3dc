"""A reader process: poll a store with a fresh ``xr.open_zarr`` each time during a build.

Prints JSON: how many pages it saw done at each poll, and any page that was
``status == 1`` while its embeddings were NaN or its text was empty.
"""
import json
import sys
import time

import numpy as np
import xarray as xr

store, n = sys.argv[1], int(sys.argv[2])
has_text = {int(k): v for k, v in json.loads(open(sys.argv[3]).read()).items()}
seen, bad, polls = [], [], 0
t0 = time.time()
while time.time() - t0 < 120:
    ds = xr.open_zarr(store)
    status = ds["status"].values
    done = np.flatnonzero(status == 1)
    if len(done):
        emb = ds["page_embeddings"].values[done]
        nan_rows = done[np.isnan(emb).any(axis=1)]
        mask = ds["panel_mask"].values[done]
        text = ds["text_content"].values[done]
        n_panels = ds["n_panels"].values[done]
        for i, row in zip(done, range(len(done))):
            if n_panels[row] > 0 and not mask[row].any():
                bad.append(f"page {int(i)} done without panels")
            if has_text[int(i)] and all(t == "" for t in text[row][mask[row]]):
                bad.append(f"page {int(i)} done with empty text")
        bad.extend(f"page {int(i)} done with NaN embedding" for i in nan_rows)
    seen.append(int(len(done)))
    polls += 1
    if len(done) == n:
        break
    time.sleep(0.02)
print(json.dumps({"seen_done": seen, "bad": bad[:50], "polls": polls}))
