"""Evaluation outputs: published reference numbers, leaderboard tables, CMC curves, and the local HF
`evaluate` module `metrics/text_person_retrieval` (evaluate.load("metrics/text_person_retrieval"))."""
