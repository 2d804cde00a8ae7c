"""Production feedback: labels that users and reviewers give served predictions, stored in a real
database (SQLite by default, PostgreSQL in staging and production) and learned from by
``ctt learn --feedback``. ``database`` stores and reads rows, ``schema`` is the table, ``api``
the HTTP schemas and metrics of ``/feedback``; ``migrations`` holds the Alembic migrations."""
