"""Training: the loss with class balance through `pos_weight` (`loss`), learning-rate schedules (`schedules`),
one epoch (`steps`), the loop with validation, early stopping and its resume point (`loop`), and torchrun/DDP
across processes and machines (`distributed`).
"""
