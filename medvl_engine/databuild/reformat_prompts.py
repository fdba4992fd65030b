"""The texts of `build-data reformat`: PubMedVision's prompt template, ten QA scenarios, alignment questions.

The template is the paper's Figure 4 (images first, then the instructions, then the context inside
`<reference>`); the reply is JSON with `Image_description`, `QA-query` and `QA-answer`. The scenario
names are the paper's ten (appendix D); their prompts are written for this project. The alignment
questions ("describe this image", appendix C) are asked of the description: one set for a single
image and one for several.

    scenario = SCENARIOS[k]
    text = reformat_prompt(scenario.prompt, record.text())
"""

from __future__ import annotations

from typing import NamedTuple


class Scenario(NamedTuple):
    name: str
    prompt: str


_PAIR = "You need to generate a question-and-answer pair based on the image(s)."

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("Standard Q&A", f"{_PAIR} Ask a plain, conversational question that checks whether someone "
             "understands what the image shows; answer it like an expert, with the findings visible in the "
             "image and a detailed, informative analysis of them."),
    Scenario("Doctor to Doctor", f"{_PAIR} Write it as one physician consulting a colleague about the image: "
             "a precise clinical question and a thorough professional answer grounded in what the image shows."),
    Scenario("Senior Doctor and Intern", f"{_PAIR} A senior physician quizzes an intern on the image to test "
             "observation and reasoning; the intern answers, naming the findings and explaining how they "
             "lead to an interpretation."),
    Scenario("Evaluator and AI Model", f"{_PAIR} A quality-control reviewer probes an AI model's reading of the "
             "image with a question about a subtle or easily missed detail; the model answers precisely and "
             "says where in the image the detail is."),
    Scenario("Doctor and Patient's Family", f"{_PAIR} A relative of the patient asks about the image (what it "
             "shows, how serious it is, what happens next); the doctor answers in everyday words, patiently "
             "and accurately, without jargon."),
    Scenario("Doctor and Difficult Patient", f"{_PAIR} A doubtful patient challenges the diagnosis the image "
             "supports; the doctor answers calmly, points to what the image shows, and explains the condition "
             "clearly enough to earn the patient's trust."),
    Scenario("Intern and Specialist Doctor", f"{_PAIR} An intern asks a specialist a question about the image; "
             "the specialist gives a detailed answer that teaches how to read such an image."),
    Scenario("AI Model Assisting Doctor", f"{_PAIR} A doctor asks an AI assistant about structures, "
             "abnormalities or their clinical significance in the image; the assistant gives a detailed analysis "
             "to support the doctor's decision and leaves the final diagnosis to the doctor."),
    Scenario("Medical Teacher and Student", f"{_PAIR} A teacher asks a student to analyse the image and suggest "
             "possible diagnoses; the student answers, describing the observations and the reasoning from them "
             "to a differential diagnosis."),
    Scenario("AI Model Assisting Patient", f"{_PAIR} A patient asks an AI assistant what something on their "
             "image means; the assistant explains it simply (shape, density, what an abnormal area may mean) "
             "and reminds the patient that a doctor makes the final interpretation."),
)

SINGLE_IMAGE_QUESTIONS: tuple[str, ...] = (
    "Please describe this image.",
    "Can you describe the image for me?",
    "What does this image show?",
    "Describe what you see in this medical image.",
    "Could you give a detailed description of this image?",
    "What are the key findings in this image?",
    "Explain the visual content of this image.",
    "Analyze this image in a comprehensive and detailed manner.",
    "Write a detailed description of the given image.",
    "What is depicted in this picture?",
    "Walk me through what this image shows.",
)

MULTI_IMAGE_QUESTIONS: tuple[str, ...] = (
    "Please describe these images.",
    "Can you describe the images for me?",
    "What do these images show?",
    "Describe what you see in these medical images.",
    "Could you give a detailed description of these images?",
    "What are the key findings across these images?",
    "Explain the visual content of the images.",
    "Analyze the images in a comprehensive and detailed manner.",
    "Write a detailed description of the given images.",
    "What is depicted in these pictures?",
    "Walk me through what these images show.",
)

TEMPLATE = (
    "Please complete the following tasks based on the medical images and reference information provided by me.\n"
    "1. Generate a detailed and professional description (Image_description). The description must reflect your "
    "professionalism and provide as many details as possible from the image. The more comprehensive and precise, "
    "the better.\n"
    "2. {scenario}\n"
    "The contextual text is marked by <reference>. You need to refer to it to ensure the accuracy of the content "
    "you generate, but do not mention the existence of this reference information when generating data.\n"
    "Your reply must be in JSON format, formatted as\n"
    '{{"Image_description": ..., "QA-query": ..., "QA-answer": ...}}\n'
    "<reference>\n{context}\n</reference>"
)


def reformat_prompt(scenario_prompt: str, context: str) -> str:
    """The user text of Figure 4 (the images go before it in the same message)."""
    return TEMPLATE.format(scenario=scenario_prompt, context=context)


def alignment_questions(num_images: int) -> tuple[str, ...]:
    return MULTI_IMAGE_QUESTIONS if num_images > 1 else SINGLE_IMAGE_QUESTIONS
