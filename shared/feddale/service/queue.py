"""The contract between the coordinator and the student-trainer that is not HTTP: the RQ queue and job."""

from __future__ import annotations

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer


# Contracts between services that are not HTTP: the RQ queue and job the coordinator enqueues
# and the student-trainer executes (the coordinator never imports the trainer package).
STUDENT_QUEUE = "feddale-student"
STUDENT_JOB = "feddale_student_trainer.jobs.train_student_job"


def student_queue(connection: Redis) -> Queue:
    """The student queue, JSON-serialized on both ends.

    RQ's default serializer is pickle: whoever could write a job into Redis would run code in
    the trainer when it was dequeued. With JSON a job is data (a function name from the trainer's
    own package, string arguments), and a pickled job pushed by anyone else fails to decode.
    """
    return Queue(STUDENT_QUEUE, connection=connection, serializer=JSONSerializer)


def fetch_job(job_id: str, connection: Redis) -> Job:
    """A student job by id, decoded with the queue's serializer."""
    return Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
