-- One role and one database per service: each service owns its data.
CREATE ROLE users LOGIN PASSWORD 'users-dev';
CREATE DATABASE users OWNER users;
CREATE ROLE posts LOGIN PASSWORD 'posts-dev';
CREATE DATABASE posts OWNER posts;
CREATE ROLE comments LOGIN PASSWORD 'comments-dev';
CREATE DATABASE comments OWNER comments;
CREATE ROLE notifications LOGIN PASSWORD 'notifications-dev';
CREATE DATABASE notifications OWNER notifications;
