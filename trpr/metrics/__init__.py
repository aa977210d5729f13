"""Evaluation outputs: published reference numbers, leaderboard tables, CMC curves, and the local HF
`evaluate` module `trpr/metrics/text_person_retrieval` (evaluate.load("trpr/metrics/text_person_retrieval"))."""
