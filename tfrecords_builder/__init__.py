"""tfrecords_builder."""
