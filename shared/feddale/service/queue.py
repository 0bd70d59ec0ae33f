"""The contract between the coordinator and the student-trainer that is not HTTP: the RQ queue and job."""

from __future__ import annotations


# Contracts between services that are not HTTP: the RQ queue and job the coordinator enqueues
# and the student-trainer executes (the coordinator never imports the trainer package).
STUDENT_QUEUE = "feddale-student"
STUDENT_JOB = "feddale_student_trainer.jobs.train_student_job"
