"""The report's figures from a run: curves, confusion matrix, misclassified images.

Pure functions of arrays and histories that return a matplotlib Figure and,
given a path, save it as PNG; the notebooks show the same figures inline.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from sklearn import metrics as sk_metrics

# Up to this many classes the confusion matrix is drawn with names and counts
# (the report's Fig. 15 has 20); above it, an ordered heat map.
NAMED_MATRIX_MAX_CLASSES = 30


def _save(figure: plt.Figure, path: str | pathlib.Path | None) -> plt.Figure:
  if path is not None:
    figure.savefig(path, dpi=100)
  return figure


def short_name(class_name: str) -> str:
  """words.txt lists synonyms ('boa constrictor, Constrictor constrictor')."""
  return class_name.split(',')[0].strip()


def training_curves(history: Sequence[dict[str, Any]],
                    path: str | pathlib.Path | None = None) -> plt.Figure:
  """Train/val top-1 and loss per epoch, learning-rate changes marked (Fig. 4-14)."""
  if not history:
    raise ValueError('The history is empty: no epoch has finished yet')
  epochs = [entry['epoch'] for entry in history]
  figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(11, 4))
  for axis, metric, label in ((accuracy_axis, 'top1_accuracy', 'top-1 accuracy'),
                              (loss_axis, 'loss', 'loss')):
    axis.plot(epochs, [e[f'train_{metric}'] for e in history], label='train')
    axis.plot(epochs, [e[f'val_{metric}'] for e in history], label='validation')
    for previous, entry in zip(history, history[1:]):
      if entry['learning_rate'] != previous['learning_rate']:
        axis.axvline(entry['epoch'], color='gray', linestyle='--', linewidth=0.8)
    axis.set_xlabel('epoch')
    axis.set_ylabel(label)
    axis.grid(alpha=0.3)
  accuracy_axis.plot([], [], color='gray', linestyle='--', label='learning rate change')
  accuracy_axis.legend()
  figure.tight_layout()
  return _save(figure, path)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray,
                     num_classes: int) -> np.ndarray:
  return sk_metrics.confusion_matrix(labels, predictions, labels=np.arange(num_classes))


def most_confused_pairs(matrix: np.ndarray, class_names: Sequence[str],
                        count: int = 10) -> list[dict[str, Any]]:
  """The largest off-diagonal cells: true class, predicted class, images."""
  off_diagonal = matrix.copy()
  np.fill_diagonal(off_diagonal, 0)
  order = np.argsort(-off_diagonal, axis=None, kind='stable')[:count]
  pairs = []
  for flat in order:
    true, predicted = np.unravel_index(flat, matrix.shape)
    if off_diagonal[true, predicted] == 0:
      break
    pairs.append({'true': class_names[true], 'predicted': class_names[predicted],
                  'count': int(off_diagonal[true, predicted]),
                  'share_of_true': float(off_diagonal[true, predicted]
                                         / max(matrix[true].sum(), 1))})
  return pairs


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str],
                     path: str | pathlib.Path | None = None) -> plt.Figure:
  """Fig. 15: named and annotated up to 30 classes, else an ordered heat map.

  Rows are normalised to the true class. Above 30 classes, classes are
  ordered by how often they are confused with each other (a greedy walk
  along the strongest confusions), so blocks of related classes show.
  """
  num_classes = len(class_names)
  normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
  if num_classes <= NAMED_MATRIX_MAX_CLASSES:
    size = max(6.0, 0.45 * num_classes + 2)
    figure, axis = plt.subplots(figsize=(size + 1.5, size))
    image = axis.imshow(normalised, cmap='Blues', vmin=0, vmax=1)
    names = [short_name(n) for n in class_names]
    axis.set_xticks(range(num_classes), names, rotation=90)
    axis.set_yticks(range(num_classes), names)
    for i in range(num_classes):
      for j in range(num_classes):
        if matrix[i, j]:
          axis.text(j, i, str(matrix[i, j]), ha='center', va='center', fontsize=7,
                    color='white' if normalised[i, j] > 0.5 else 'black')
  else:
    order = _confusion_order(normalised)
    figure, axis = plt.subplots(figsize=(9, 8))
    image = axis.imshow(normalised[np.ix_(order, order)], cmap='viridis', vmin=0,
                        vmax=max(normalised.max(), 1e-9))
    axis.set_title('classes ordered by mutual confusion')
  axis.set_xlabel('predicted')
  axis.set_ylabel('true')
  figure.colorbar(image, ax=axis, fraction=0.046, label='share of the true class')
  figure.tight_layout()
  return _save(figure, path)


def _confusion_order(normalised: np.ndarray) -> list[int]:
  symmetric = normalised + normalised.T
  np.fill_diagonal(symmetric, -1)
  remaining = set(range(len(normalised)))
  order = [int(np.argmax(symmetric.max(axis=1)))]
  remaining.discard(order[0])
  while remaining:
    candidates = sorted(remaining)
    nearest = candidates[int(np.argmax(symmetric[order[-1], candidates]))]
    order.append(nearest)
    remaining.discard(nearest)
  return order


def misclassified_gallery(images: np.ndarray, labels: np.ndarray,
                          predictions: np.ndarray, class_names: Sequence[str],
                          path: str | pathlib.Path | None = None,
                          count: int = 16) -> plt.Figure:
  """Misclassified images with true and predicted names (Fig. 16-19)."""
  wrong = np.flatnonzero(labels != predictions)[:count]
  if not len(wrong):
    raise ValueError('No misclassified image to show: every prediction is right')
  columns = min(4, len(wrong))
  rows = -(-len(wrong) // columns)
  figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows),
                              squeeze=False)
  for axis in axes.flat:
    axis.axis('off')
  for axis, index in zip(axes.flat, wrong):
    axis.imshow(images[index], interpolation='nearest')
    axis.set_title(f'true: {short_name(class_names[labels[index]])}\n'
                   f'predicted: {short_name(class_names[predictions[index]])}',
                   fontsize=8)
  figure.tight_layout()
  return _save(figure, path)
