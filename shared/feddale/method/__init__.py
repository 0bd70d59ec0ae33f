"""The method: preprocessing, teacher, student, federation, wire codecs, models, detector, metrics, config."""
