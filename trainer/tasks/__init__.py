"""Problems and how they are scored: data loading (:mod:`.data`), prompts (:mod:`.prompts`), rewards
(:mod:`.rewards`)."""
