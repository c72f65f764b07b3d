"""The evaluate stage: the metrics of samples and the stage that reports them."""
