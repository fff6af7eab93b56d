"""The platform's store: one SQLAlchemy database (embedded SQLite by default, PostgreSQL by URL) for
files and fine-tuning jobs, and a directory for the files' bytes (ember.store.db, ember.store.files)."""
