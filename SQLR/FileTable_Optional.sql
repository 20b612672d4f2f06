-- Optional, not run by default: a FileTable for shops that keep images in a FILESTREAM share. Needs
-- FILESTREAM enabled on the instance (SQL Server Configuration Manager) and a FILESTREAM filegroup.
-- Load its images with dbo.AddImage (the label is the parent folder's name):
--   SELECT f.name, p.name AS label, f.file_stream FROM dbo.ImageFiles AS f
--   JOIN dbo.ImageFiles AS p ON f.parent_path_locator = p.path_locator WHERE f.is_directory = 0;
ALTER DATABASE CURRENT SET FILESTREAM (NON_TRANSACTED_ACCESS = FULL, DIRECTORY_NAME = N'ImageSimilarity');
GO
IF OBJECT_ID(N'dbo.ImageFiles', N'U') IS NULL
    CREATE TABLE dbo.ImageFiles AS FILETABLE WITH (FILETABLE_DIRECTORY = N'images');
GO
