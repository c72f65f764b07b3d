"""The download and preprocess stages' work, and the processed splits as the train and evaluate
stages read them."""
