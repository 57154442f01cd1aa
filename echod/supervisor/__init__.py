"""Worker processes: the pool, one supervised process each, the worker, their channel."""
