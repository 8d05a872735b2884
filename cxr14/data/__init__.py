"""The data a stage reads and writes: the NIH layout and its 14 class names (`nih`), the official split lists
and a patient-disjoint val split (`splits`), image decoding (`images`), the expert box list (`boxes`), the
prepared uint8 arrays that training reads instead of PNGs (`arrays` owns their format), batches from those
arrays (`loader`), and the built-in synthetic demo dataset in the exact NIH layout (`demo`, `phantom`).
"""
