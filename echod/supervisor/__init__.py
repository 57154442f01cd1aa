"""Worker processes: the pool, one worker, their channel, their figures added up."""
