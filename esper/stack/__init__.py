"""The local stack behind `esper up`: servers (embedded unless URLs are given),
migrations, the signing key, and one supervised process per stage worker."""
