from django.urls import path

from visualization import views

urlpatterns = [
    path("", views.home, name="home"),
]
