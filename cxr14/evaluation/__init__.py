"""Evaluation, all on saved predictions: ROC-AUC and the patient bootstrap (`metrics`), the test report
(`scoring`), the predictions CSV contract (`predictions`), thresholds and probability calibration
(`calibration`), subgroups (`subgroups`), Google's expert labels (`expert`), and whether one run's test AUC
differs from another's beyond test-sample luck (`compare`, behind the `cxr14-compare` command in `cxr14.cli`).
"""
