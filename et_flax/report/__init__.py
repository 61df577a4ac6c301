"""The report's side: its numbers (`report_numbers`, their one owner), its
findings checked against our runs (`findings`), and a run's figures
(`analysis`: curves, confusion matrix, misclassified images)."""
