"""Neural-network building blocks shared by methods and the training loop: losses, momentum state and queues,
the distributed gathers, pooling and encoders. Imports run one way: methods/ and train/ import this package,
never the reverse."""
