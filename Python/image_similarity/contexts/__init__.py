"""Places that run the steps besides this process: the database server (SQL Server, PostgreSQL) and Spark."""
