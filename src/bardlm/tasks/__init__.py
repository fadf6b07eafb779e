"""Small tasks and experiments built on the library: probes, toy seq2seq problems, doc figures."""
