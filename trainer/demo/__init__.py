"""``sodkern demo``: the synthetic task (:mod:`.task`), the run (:mod:`.demo`), its report (:mod:`.plots`), and
the tiny in-code models and tokenizer (:mod:`.tiny`) that the demo and the tests build."""
