"""Online training (`recsys train online`): a consumer group of trainers that flush deltas every few seconds.

- ``guard``: progressive validation of each flush and the decision to publish it or not;
- ``rows``: the local cache of pulled rows with their row-wise Adagrad deltas, and the dense sync;
- ``learner``: the model (training/model.py's DenseArch over pooled rows), a batch step, a flush;
- ``service``: the Kafka consumer loop, offsets committed after their flush, the flush journal;
- ``cli``: the command.

See the README's "Online training" section for the guarantees.
"""
