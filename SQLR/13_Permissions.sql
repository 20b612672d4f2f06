-- The database role under which a login that is not sysadmin (a data scientist, an application) runs
-- image-similarity. "Grant users permission to execute Python and R scripts" (SQL Server Machine Learning
-- Services): EXECUTE ANY EXTERNAL SCRIPT is granted in each database where scripts run. EXECUTE on the dbo
-- schema covers every procedure of SQLR/; SELECT on it covers the procedures' @input_data_1 queries, which
-- run as the caller (this emulation assumes they leave the procedure's ownership chain, like dynamic SQL).
-- A DBA adds members: CREATE USER [login] FOR LOGIN [login]; ALTER ROLE image_similarity_user ADD MEMBER [login];
IF DATABASE_PRINCIPAL_ID(N'image_similarity_user') IS NULL
    CREATE ROLE image_similarity_user;
GO
GRANT EXECUTE ANY EXTERNAL SCRIPT TO image_similarity_user;
GRANT EXECUTE ON SCHEMA::dbo TO image_similarity_user;
GRANT SELECT ON SCHEMA::dbo TO image_similarity_user;
GO
