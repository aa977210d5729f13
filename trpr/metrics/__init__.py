"""Metric maths and reference numbers: the CMC curve (`cmc`), the published results of other methods
(`published`), and the local HF `evaluate` module `trpr/metrics/text_person_retrieval`
(evaluate.load("trpr/metrics/text_person_retrieval")). Tables and figures: `trpr.reporting`."""
