"""`python -m feddale_student_trainer`: run the RQ worker (plus /healthz, /readyz, /metrics)."""

from feddale_student_trainer.worker import main

if __name__ == "__main__":
    main()
