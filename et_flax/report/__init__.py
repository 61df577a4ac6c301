"""The report's side: its findings checked against our runs (`findings`), and
a run's figures (`analysis`: curves, confusion matrix, misclassified images)."""
