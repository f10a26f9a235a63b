"""One module per stage of the pipeline: cache-targets, pretrain, extract-student and the cache tools."""
