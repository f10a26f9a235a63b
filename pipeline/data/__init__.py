"""Stage-two data: the epoch order, the cached-target dataset and the online-teacher dataset."""
